"""natgrad's K-FAC inside Hugging Face ``Trainer`` (a custom optimizer).

K-FAC is built on the Hugging Face model itself: its hooks see every training forward pass,
and from the ``ModelOutput`` the model returns (loss, logits, …) they take the ``logits``
(:func:`natgrad.outputs.output_tensor`). ``Trainer(..., optimizers=(kfac, None))`` then trains
with K-FAC; Trainer's own learning-rate schedule and gradient clipping apply to it as to any
torch optimizer. A tiny BERT classifier, built from a config (nothing downloaded), learns a
synthetic task: is the first token below 10?

    python examples/recipes/hf_trainer_kfac.py [--tiny]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from natgrad.optim import KFAC


def dataset(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 20, (n, 8), generator=g)
    labels = (ids[:, 0] < 10).long()
    return [{"input_ids": i, "labels": y} for i, y in zip(ids, labels, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the model is tiny)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=8, num_labels=2)
    model = BertForSequenceClassification(config)
    kfac = KFAC(model, lr=0.05, damping=0.1, likelihood="categorical", momentum=0.9)
    steps = 40 if args.tiny else 200
    train, test = dataset(512, 0), dataset(256, 1)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(
            model=model, train_dataset=train, eval_dataset=test,
            optimizers=(kfac, None),
            args=TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=32,
                                   learning_rate=0.05, lr_scheduler_type="constant",
                                   report_to="none", use_cpu=True, save_strategy="no",
                                   logging_steps=steps, disable_tqdm=True))
        first = trainer.evaluate()["eval_loss"]
        trainer.train()
        last = trainer.evaluate()["eval_loss"]
    print(f"K-FAC in Trainer: {steps} steps, eval loss {first:.4g} -> {last:.4g}")
    print(f"K-FAC preconditioned layers: {len(kfac.preconditioner.layers)}; curvature "
          f"updates: {kfac.preconditioner.curvature.steps}")


if __name__ == "__main__":
    main()
