"""Follow-up of the replication (issue 12, "pretraining must show"): what do the pretrained models' *frozen*
features carry about SST-2, next to the same architectures with random weights?

    python scripts/replicate_linear_probe.py --run runs/replicate4 [--extra runs/tapt/teacher]

For each model (the run's teacher and student, each also with random weights drawn as the from-scratch
baselines are), the SST-2 training and dev sentences go through the frozen model once; an L2-regularised
logistic regression is trained on three feature sets -- the final layer's ``[CLS]`` vector, the final layer
averaged over the tokens, and the input embeddings averaged over the tokens (word + position + type, before any
layer) -- and scored on dev. Reference row: the same regression on token counts (a bag of WordPiece ids of the
run's vocabulary), i.e. what a linear model on word identity alone gets. The regularisation strength is chosen
on a fixed 10% of the training sentences, never on dev. ~2 min on 2 cores. A diagnostic, not part of the recipe.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def sst2(glue_dir: str) -> tuple[list[str], list[int], list[str], list[int]]:
    from distilflow.tasks.evaluate.glue import find_task_files, read_glue_file

    files = find_task_files(glue_dir, "sst2")
    tr, dv = read_glue_file(files.train, "sst2").examples, read_glue_file(files.dev, "sst2").examples
    return [e.text_a for e in tr], [int(e.label) for e in tr], [e.text_a for e in dv], [int(e.label) for e in dv]


def features(model_dir: str, scratch: bool, texts: list[str], seed: int = 0):
    """[N, 3H]: final-layer [CLS] | final-layer token mean | input-embedding token mean."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    if scratch:
        model = AutoModel.from_config(AutoConfig.from_pretrained(model_dir))
    else:
        model = AutoModel.from_pretrained(model_dir, use_safetensors=True)
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), 128):
            enc = tok(texts[i:i + 128], padding=True, truncation=True, max_length=128, return_tensors="pt")
            enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            o = model(**enc, output_hidden_states=True)
            a = enc["attention_mask"].unsqueeze(-1).float()  # [B, L, 1]
            last, first = o.hidden_states[-1], o.hidden_states[0]  # [B, L, H]
            out.append(torch.cat([last[:, 0], (last * a).sum(1) / a.sum(1), (first * a).sum(1) / a.sum(1)], -1))
    return torch.cat(out)


def bag_of_ids(model_dir: str, texts: list[str]):
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    x = torch.zeros(len(texts), tok.vocab_size)
    for i, ids in enumerate(tok(texts, truncation=True, max_length=128, add_special_tokens=False)["input_ids"]):
        x[i].index_add_(0, torch.tensor(ids, dtype=torch.long), torch.ones(len(ids)))
    return torch.log1p(x)


def probe(x_train, y_train, x_dev, y_dev) -> dict[str, float]:
    """Logistic regression (LBFGS), features standardised on train; weight decay chosen on 10% of train."""
    import torch

    torch.manual_seed(0)
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_dev = (x_train - mu) / sd, (x_dev - mu) / sd
    y_train, y_dev = torch.tensor(y_train), torch.tensor(y_dev)
    perm = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(0))
    val, fit = perm[: len(perm) // 10], perm[len(perm) // 10:]

    def train(idx, wd: float) -> torch.nn.Linear:
        lin = torch.nn.Linear(x_train.shape[1], 2)
        opt = torch.optim.LBFGS(lin.parameters(), max_iter=300, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(lin(x_train[idx]), y_train[idx]) + wd * lin.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return lin

    def acc(lin, x, y) -> float:
        with torch.no_grad():
            return float((lin(x).argmax(1) == y).float().mean()) * 100

    best = max(WEIGHT_DECAYS, key=lambda wd: acc(train(fit, wd), x_train[val], y_train[val]))
    return {"dev_accuracy": round(acc(train(torch.arange(len(y_train)), best), x_dev, y_dev), 2), "weight_decay": best}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/replicate4", help="a replication run folder (teacher/, student/)")
    ap.add_argument("--extra", nargs="*", default=[], help="more pretrained model folders to probe")
    ap.add_argument("--glue-dir", default=str(REPO.parent / "shared" / "data" / "glue"))
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args()
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    tr, ytr, dv, ydv = sst2(args.glue_dir)
    run = Path(args.run)
    models = [(str(run / "teacher"), False), (str(run / "teacher"), True), (str(run / "student"), False),
              (str(run / "student"), True)] + [(m, False) for m in args.extra]
    bag = probe(bag_of_ids(str(run / "teacher"), tr), ytr, bag_of_ids(str(run / "teacher"), dv), ydv)
    results: dict[str, dict] = {"bag of WordPiece ids": bag}
    print(f"bag of WordPiece ids: {bag['dev_accuracy']}", flush=True)
    for path, scratch in models:
        xtr, xdv = features(path, scratch, tr), features(path, scratch, dv)
        h = xtr.shape[1] // 3
        row = {name: probe(xtr[:, k * h:(k + 1) * h], ytr, xdv[:, k * h:(k + 1) * h], ydv)
               for k, name in enumerate(("final [CLS]", "final mean", "embeddings mean"))}
        name = f"{path} ({'random weights' if scratch else 'pretrained'})"
        results[name] = row
        print(name + ": " + ", ".join(f"{k} {v['dev_accuracy']}" for k, v in row.items()), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
