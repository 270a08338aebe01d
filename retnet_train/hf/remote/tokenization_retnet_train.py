"""The tokenizer of a retnet_train model: its sentencepiece model (tokenizer.model), used as training used it.

Training encoded each document as [bos] + sentencepiece.encode(text) + [eos] (data_prep/shards.py)
and retnet_train.generate encodes a prompt as [bos] + encode(text); this class gives those ids
(add_special_tokens=True prepends bos) and decodes with sentencepiece itself, so text round-trips
exactly as it does in retnet_train (identity normalisation, byte fallback, whitespace kept).
"""

import os
import shutil

import sentencepiece as spm
from transformers import PreTrainedTokenizer


class RetNetTrainTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, add_bos_token=True, add_eos_token=False, **kwargs):
        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor(model_file=vocab_file)  # before super(): it asks for the vocabulary
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        for key, index in (("bos_token", self.sp.bos_id()), ("eos_token", self.sp.eos_id()),
                           ("unk_token", self.sp.unk_id()), ("pad_token", self.sp.pad_id())):
            if index >= 0:
                kwargs.setdefault(key, self.sp.id_to_piece(index))
        kwargs.setdefault("clean_up_tokenization_spaces", False)  # the text is what sentencepiece decodes
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def get_vocab(self) -> dict:
        vocab = {self.sp.id_to_piece(i): i for i in range(self.sp.get_piece_size())}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text, **kwargs):
        return self.sp.encode(text, out_type=str)

    def _convert_token_to_id(self, token):
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index):
        # the model's vocabulary is padded past the pieces (a multiple of 128): those ids have no text
        return self.sp.id_to_piece(index) if 0 <= index < self.sp.get_piece_size() else ""

    def convert_tokens_to_string(self, tokens) -> str:
        return self.sp.decode_pieces([t for t in tokens if t])

    def _decode(self, token_ids, skip_special_tokens=False, **kwargs) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        special = set(self.all_special_ids) if skip_special_tokens else set()
        ids = [int(i) for i in token_ids if 0 <= int(i) < self.sp.get_piece_size() and int(i) not in special]
        return self.sp.decode(ids)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        bos = [self.sp.bos_id()] if self.add_bos_token else []
        eos = [self.sp.eos_id()] if self.add_eos_token else []
        out = bos + token_ids_0 + eos
        return out if token_ids_1 is None else out + bos + token_ids_1 + eos

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        bos, eos = [1] if self.add_bos_token else [], [1] if self.add_eos_token else []
        mask = bos + [0] * len(token_ids_0) + eos
        return mask if token_ids_1 is None else mask + bos + [0] * len(token_ids_1) + eos

    def save_vocabulary(self, save_directory, filename_prefix=None):
        out = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model")
        if os.path.abspath(out) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, out)
        return (out,)
