"""The configuration of a retnet_train model in a Hugging Face folder (written by retnet_train.export --hf).

The network's own settings (retnet_train's ModelConfig, both architectures) travel whole under
`retnet_train_config`, so they cannot collide with transformers' config attributes; the usual
attributes (vocab_size, hidden_size, ...) are copies for tools that read them.
"""

from transformers import PretrainedConfig


class RetNetTrainConfig(PretrainedConfig):
    model_type = "retnet_train"

    def __init__(self, retnet_train_config=None, **kwargs):
        self.retnet_train_config = dict(retnet_train_config or {})
        net = self.retnet_train_config
        for ours, theirs in (("vocab_size", "vocab_size"), ("d_model", "hidden_size"),
                             ("n_layers", "num_hidden_layers"), ("n_heads", "num_attention_heads")):
            if ours in net:
                kwargs.setdefault(theirs, net[ours])
        # the folder stores lm_head.weight even when it is the embedding: nothing for transformers to tie
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)
