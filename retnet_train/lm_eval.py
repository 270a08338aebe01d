"""`python -m retnet_train.lm_eval ARGS`: lm-evaluation-harness's `lm_eval` command, with the
model `retnet_train` registered (lm-eval looks models up in its own package only, so the command
must import ours first). Takes every argument `lm_eval` takes, e.g.

    python -m retnet_train.lm_eval --model retnet_train --model_args checkpoint=runs/x \
        --tasks lambada_openai,hellaswag --batch_size 16
"""

import sys


def main() -> None:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:
        sys.exit(f"error: lm-evaluation-harness is not installed ({e}): pip install -e '.[eval]'")
    import retnet_train.lm_eval_adapter  # noqa: F401  (registers the model)

    cli_evaluate()


if __name__ == "__main__":
    main()
