"""The synthetic skills of the sweep demonstration (``sweep_demo.py``), and their scoring.

Every example is one token sequence: ``BOS TASK s1 ... sn = a1 ... an`` over two alphabets of
ten symbols (digits and letters), where the answer is a digit string copied (task C), a letter
string in a cipher (task P: letter i becomes 3i + 2 modulo 10), or either raised by one symbol
modulo 10 (task S, the base model's pre-training only). A model is scored by the share of
answer symbols it predicts right, teacher-forced: all of a sequence right under teacher
forcing is exactly what greedy decoding would produce, so one forward pass scores it.

Run as a script, it is the sweep's evaluation command: ``python bench/sweep_skills.py MODEL``
prints each skill's accuracy on stderr and their mean, the score, on stdout.
"""

from __future__ import annotations

import sys

import torch

DIGITS = 8  # symbols per example
# Two alphabets of ten symbols: digits (tokens 0-9) and letters (10-19).
LETTERS = 10
BOS, COPY, SPELL, SHIFT, EQUALS = 20, 21, 22, 23, 24
VOCAB = 26
TASKS = {"copy": COPY, "spell": SPELL, "shift": SHIFT}
# The experts' skills: copy digit strings; spell letter strings in a cipher (each letter i
# becomes 3i + 2 modulo 10). The base shifts both alphabets by one.
ALPHABET = {"copy": (0,), "spell": (LETTERS,), "shift": (0, LETTERS)}
SKILLS = ("copy", "spell")  # what the experts learn and the merge is scored on
HELD_OUT_SEED = 12345  # examples never drawn in training (training seeds are below 1000)
HELD_OUT = 512


def answer(task: int, symbols: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    if task == COPY:
        return symbols
    if task == SPELL:
        return (3 * (symbols - offset) + 2) % 10 + offset
    return (symbols - offset + 1) % 10 + offset


def batch(task_name: str, size: int, generator: torch.Generator) -> torch.Tensor:
    """``size`` examples of a task, (size, 2 * DIGITS + 3) tokens."""
    task, alphabets = TASKS[task_name], torch.tensor(ALPHABET[task_name])
    offset = alphabets[torch.randint(0, len(alphabets), (size, 1), generator=generator)]
    symbols = torch.randint(0, 10, (size, DIGITS), generator=generator) + offset
    head = torch.tensor([BOS, task]).expand(size, 2)
    equals = torch.full((size, 1), EQUALS)
    return torch.cat([head, symbols, equals, answer(task, symbols, offset)], dim=1)


def answer_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """The logits that predict the answer digits, (batch, DIGITS, VOCAB) (``model``: a
    transformers model or a ``TinyLlama``)."""
    logits = model(input_ids=tokens).logits
    return logits[:, -DIGITS - 1 : -1]


def accuracy(model, task_name: str) -> float:
    """The share of answer digits predicted right on held-out examples of a task."""
    tokens = batch(task_name, HELD_OUT, torch.Generator().manual_seed(HELD_OUT_SEED))
    with torch.no_grad():
        predicted = answer_logits(model, tokens).argmax(-1)
    return (predicted == tokens[:, -DIGITS:]).float().mean().item()


class TinyLlama:
    """A Llama forward pass in plain torch over a saved model's tensors: the score needs no
    transformers import (seconds per candidate on a busy machine). ``sweep_demo`` checks its
    logits against transformers' once."""

    def __init__(self, folder: str):
        import json
        from pathlib import Path

        from safetensors.torch import load_file

        self.weights = load_file(str(Path(folder) / "model.safetensors"))
        config = json.loads((Path(folder) / "config.json").read_text())
        self.layers = config["num_hidden_layers"]
        self.heads = config["num_attention_heads"]
        self.eps = config["rms_norm_eps"]
        rope = config.get("rope_parameters") or {}
        self.theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * scale * self.weights[name]

    def _rope(self, x: torch.Tensor) -> torch.Tensor:
        head_dim, length = x.shape[-1], x.shape[-2]
        inv_freq = 1.0 / self.theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(length).float(), inv_freq)
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
        first, second = x[..., : head_dim // 2], x[..., head_dim // 2 :]
        return x * cos + torch.cat([-second, first], -1) * sin

    def __call__(self, input_ids: torch.Tensor):
        w = self.weights
        x = w["model.embed_tokens.weight"][input_ids]
        size, length, hidden = x.shape
        for i in range(self.layers):
            at = f"model.layers.{i}."
            h = self._norm(x, at + "input_layernorm.weight")

            def heads(name: str, h=h, at=at) -> torch.Tensor:
                projected = h @ w[at + f"self_attn.{name}.weight"].T
                return projected.view(size, length, self.heads, -1).transpose(1, 2)

            q, k, v = self._rope(heads("q_proj")), self._rope(heads("k_proj")), heads("v_proj")
            mixed = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = (
                x
                + mixed.transpose(1, 2).reshape(size, length, hidden)
                @ w[at + "self_attn.o_proj.weight"].T
            )
            h = self._norm(x, at + "post_attention_layernorm.weight")
            gate = torch.nn.functional.silu(h @ w[at + "mlp.gate_proj.weight"].T)
            x = x + (gate * (h @ w[at + "mlp.up_proj.weight"].T)) @ w[at + "mlp.down_proj.weight"].T
        logits = self._norm(x, "model.norm.weight") @ w["lm_head.weight"].T
        return _Output(logits)


class _Output:
    def __init__(self, logits: torch.Tensor):
        self.logits = logits


def load(folder: str) -> TinyLlama:
    return TinyLlama(folder)


def main() -> None:
    torch.set_num_threads(1)
    model = load(sys.argv[1])
    scores = {skill: accuracy(model, skill) for skill in SKILLS}
    print(" ".join(f"{skill}={value:.4f}" for skill, value in scores.items()), file=sys.stderr)
    print(f"{sum(scores.values()) / len(scores):.6f}")


if __name__ == "__main__":
    main()
