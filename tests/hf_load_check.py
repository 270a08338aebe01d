"""Run as a script by test_hf_export.py: load a Hugging Face folder where retnet_train cannot be
imported (the folder must carry all its code) and save what transformers computes.

usage: python hf_load_check.py FOLDER OUT.pt PROMPT_TEXT [TEXT ...]
"""

import importlib.abc
import sys


class _NoRetnetTrain(importlib.abc.MetaPathFinder):
    """Refuses retnet_train, also where an editable install's finder would provide it."""

    def find_spec(self, name, path=None, target=None):
        if name == "retnet_train" or name.startswith("retnet_train."):
            raise ModuleNotFoundError(f"retnet_train is blocked in this process ({name})")


sys.meta_path.insert(0, _NoRetnetTrain())

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def main(folder: str, out: str, texts: list[str]) -> None:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    ids = [tok(t).input_ids for t in texts]
    prompt = torch.tensor([ids[0]])
    with torch.no_grad():
        logits = model(prompt).logits
        generated = model.generate(prompt, max_new_tokens=16, do_sample=False)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] == "retnet_train")
    assert not loaded, f"retnet_train was imported: {loaded}"
    torch.save({"ids": ids, "logits": logits, "generated": generated[:, prompt.shape[1]:],
                "decoded": [tok.decode(i, skip_special_tokens=True) for i in ids],
                "model_module": type(model).__module__}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
