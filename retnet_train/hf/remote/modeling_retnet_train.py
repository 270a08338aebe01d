"""A retnet_train model (RetNet or the Transformer baseline) as a transformers causal LM.

Written into a Hugging Face folder by `python -m retnet_train.export CKPT OUT --hf` beside a flat
copy of retnet_train.model (rtm_*.py, see retnet_train/hf/bundle.py): this file only adapts that
network to transformers' calling conventions, it computes nothing of its own. Its modules are
registered under their own names (embed, layers, norm, lm_head), so the folder's model.safetensors
is the same file `retnet_train.model.build_model(OUT)` reads.

Decoding state: the network's own (RetNet: one fixed-size state per layer; the Transformer: its
KV cache), carried between generate() steps in RetNetTrainCache. Prompts of a batch must have the
same length (no padding): the recurrent state has no notion of a masked token.
"""

import dataclasses

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_retnet_train import RetNetTrainConfig
from .rtm_bundle import RetNet, State, Transformer, config_from_dict, resolve_kernels

# BUNDLED FILES: retnet_train.export --hf puts here an import line per file of the flat copy (see bundle.py)

# transformers 5 names the decoding state `cache`, 4.x `past_key_values`: use the name this one has
CACHE_KEY = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


class RetNetTrainCache:
    """The network's decoding state (State) with what generate() asks of a cache."""

    is_compileable = False  # generate() would otherwise try to compile the step
    is_croppable = False

    def __init__(self, state: State, recurrent: bool):
        self.state = state
        self.is_linear = [recurrent] * len(state.layers)  # RetNet: a fixed-size state, not a growing cache

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.state.offset)


class RetNetTrainForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = RetNetTrainConfig
    base_model_prefix = "retnet_train"  # no such submodule: the checkpoint's keys are this model's own
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules = ["RetNetBlock", "TransformerBlock"]

    def __init__(self, config: RetNetTrainConfig):
        super().__init__(config)
        net_config = dict(config.retnet_train_config)
        net_config.pop("kernels", None)  # the training machine's choice; resolved here per device
        cfg = config_from_dict(net_config, source="config.json retnet_train_config")
        net = RetNet(cfg) if cfg.arch == "retnet" else Transformer(cfg)
        for name, child in net.named_children():  # the network's modules are this model's
            self.add_module(name, child)
        self.__dict__["net"] = net  # kept out of the module tree, so its weights are not registered twice
        self.__dict__["_kernels_device"] = None
        self.post_init()

    def _init_weights(self, module):
        pass  # the network draws its own initial values; a folder's weights replace them

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.lm_head

    def train(self, mode: bool = True):
        super().train(mode)
        self.net.training = mode
        return self

    def _kernels_for(self, device: torch.device) -> None:
        # the network resolves its kernels where it was built (here: meta, under from_pretrained);
        # resolve them where it runs instead, once per device
        if self._kernels_device != device:
            kernels = self.config.retnet_train_config.get("kernels", "auto")
            try:
                self.net.kernels = resolve_kernels(kernels, device)
            except ValueError:  # that choice cannot run here (e.g. fla on CPU): the automatic one can
                self.net.kernels = resolve_kernels("auto", device)
            self.__dict__["_kernels_device"] = device

    def forward(self, input_ids=None, attention_mask=None, labels=None, use_cache=None, return_dict=None,
                inputs_embeds=None, **kwargs):
        """input_ids [B, T] -> logits [B, T, vocab]. With a cache (generate() passes it), the tokens
        continue the sequences it summarises; use_cache=True returns one. Without a cache the
        parallel form runs, as the network's own model(ids) does."""
        if inputs_embeds is not None:
            raise ValueError("retnet_train models take input_ids, not inputs_embeds")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padded batches are not supported (a masked token would enter the recurrent state): "
                             "give prompts of equal length, or one prompt per call")
        cache = kwargs.pop(CACHE_KEY, None)
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        self._kernels_for(input_ids.device)
        net, recurrent = self.net, self.net.config.arch == "retnet"
        if cache is None and not use_cache:
            logits, state = net(input_ids, mode="parallel"), None
        else:
            if input_ids.shape[1] == 1 and cache is not None:
                mode = "recurrent"
            else:  # a prompt: RetNet's chunkwise form gives its state at O(T) cost, as retnet_train.generate does
                mode = "chunkwise" if recurrent else "parallel"
            logits, state = net(input_ids, mode=mode, state=cache.state if cache is not None else None,
                                return_state=True)
        loss = None
        if labels is not None:  # transformers' convention: labels are the inputs, shifted here
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        new_cache = RetNetTrainCache(state, recurrent) if state is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_KEY: new_cache})

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, use_cache=True, **kwargs):
        cache = kwargs.get(CACHE_KEY)
        if cache is None:
            cache = kwargs.get("past_key_values")
        if cache is not None:  # only the tokens the state has not seen yet
            input_ids = input_ids[:, cache.get_seq_length():]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": use_cache, CACHE_KEY: cache}

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the network keeps its own state; generate() must not make a DynamicCache for it
