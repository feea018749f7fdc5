"""What every experiment starts from, big_vision style: configs/gpt.py and configs/llama.py call
`experiment(family, arg)` and change what their experiment needs. Every key of `train`, `optim`, `data` and
`mesh` is here with its default; `model` comes from the argument (scalax/config.py: a preset, a named size,
or the parametric family) with every ModelConfig field. The defaults are sized for the small named models on
one CPU: override them (`--config.KEY=VALUE`, or in a config file) for anything bigger.
"""

import ml_collections

from scalax.config import model_fields
from scalax.parallel.rules import DEFAULT_RULES


def experiment(family: str, arg: str | None) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.model = model_fields(family, arg)
    cfg.train = ml_collections.ConfigDict({
        "steps": 500,  # run length in optimizer steps ...
        "tokens": 0,  # ... or in tokens, when positive (steps = ceil(tokens / (batch_size * seq_len)))
        "batch_size": 16,  # global batch, in sequences
        "seq_len": cfg.model.max_seq_len,  # at most the model's context
        "microbatches": 1,  # gradient accumulation: the batch is split into this many sequential parts
        "z_loss": 0.0,  # weight of log(Z)^2, PaLM's auxiliary loss (0: off)
        "seed": 0,  # initialisation and data order
        "log_every": 10,  # steps between metrics records
        "eval_every": 100,  # steps between evaluations (and at the last step)
        "eval_windows": 64,  # fixed validation windows per evaluation
        "eval_batch_size": 0,  # windows per evaluation batch (0: train.batch_size)
        "checkpoint_every": 100,  # steps between kept checkpoints ...
        "keep_checkpoints": 3,  # ... of which the newest this many stay
        "checkpoint_steps": (),  # also save at these steps, and keep them (a wsd_branch trunk's branch points)
        "checkpoint_minutes": 0.0,  # also save after this much wall time, replacing the previous such save (0: off)
        # Steps per compiled call, up to this many between two logs, evals or saves; the same numbers either way.
        # 0 (auto): 10 on CPU, where each call pays its dispatch and the first touch of its temporaries' pages
        # (the tiny configs' steps 1.2x faster), 1 on GPU and TPU.
        "steps_per_call": 0,
    })
    cfg.optim = ml_collections.ConfigDict({
        "lr": 3e-3,  # the peak learning rate
        "schedule": "cosine",  # cosine | wsd | constant (each after a linear warmup)
        "warmup_steps": 50,
        "warmup_tokens": 0,  # > 0: the warmup in tokens instead (ceil(tokens / tokens per step) steps)
        "final_lr_fraction": 0.1,  # the schedule ends at lr * this, exactly at the run's last step
        "wsd_decay_fraction": 0.2,  # wsd: the share of steps spent cooling down at the end
        "wsd_decay_shape": "linear",  # wsd: the cooldown, linear | cosine | 1-sqrt (Hägele et al. 2024)
        "b1": 0.9,  # AdamW's moments
        "b2": 0.95,
        "eps": 1e-8,
        "weight_decay": 0.1,  # decoupled, on matmul kernels only
        "decay_embeddings": False,  # also decay lookup tables (token, position, relative-bias); norms and biases never
        "grad_clip": 1.0,  # global-norm clipping (0: off)
    })
    cfg.data = ml_collections.ConfigDict({
        "corpus": "stdlib",  # stdlib | a text file | a directory | a glob | a .jsonl file
        "text_field": "text",  # the JSONL field holding each document's text
        "tokenizer": "byte",  # byte | bpe | a Hugging Face tokenizer.json (or a directory holding one)
        "bpe_vocab_size": 4096,  # bpe: trained on the train split the first time
        "token_dtype": "",  # a pre-tokenized .bin corpus (nanoGPT-style): uint16 or uint32
        "vocab_multiple": 1,  # model.vocab_size 0 is the tokenizer's, rounded up to a multiple of this (e.g. 128)
        "val_fraction": 0.02,  # share of documents held out (by a hash of their id)
        "cache_dir": "~/.cache/scalax/tokens",  # token caches, reused while corpus and tokenizer are unchanged
        "shard_tokens": 100_000_000,  # tokens per shard file of a token cache (the last of a split holds fewer)
        "prefetch": 16,  # batches read ahead
    })
    # Axis sizes (-1: the devices left over; the product is the device count) and the logical axis rules
    # (scalax/parallel/rules.py). The default: pure data parallelism over every device.
    cfg.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1,
                                          "rules": [list(rule) for rule in DEFAULT_RULES]})
    return cfg
