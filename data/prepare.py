"""Prepare a task suite as JSONL files of normalised examples (nanoGPT-style data/prepare.py).

    python data/prepare.py builtin                                  # generated in code, offline
    python data/prepare.py glue --source ../shared/data --out data/
    python data/prepare.py commonsense --tasks piqa,siqa
    python data/prepare.py math                                     # GSM8K (../shared/data/math/gsm8k)
    python data/prepare.py bbh                                      # evaluation only: writes <task>-test.jsonl

Reads the original files under `<source>/<suite>/<task>/` (downloaded into ~/.cache/nanoalign/data without one) and
writes `<out>/<suite>/[cloze/]<task>-{train,dev,test}.jsonl` in the label and cloze formats. Training splits are
capped as in the Align-LoRA data code (TRAIN_CAPS); dev comes from the rows the cap leaves out, else an official
held-out split, and never changes train or test. Tasks whose files are absent are skipped.
"""

import argparse
import shutil
import sys
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from nanoalign.plumbing.datasets import data_file, write_jsonl  # noqa: E402
from nanoalign.plumbing.system import write_atomic  # noqa: E402
from nanoalign.plumbing.tasks import (FORMATS, LABEL_ONLY, SUITES, TRAIN_CAPS, builtin_examples,  # noqa: E402
                                      dev_positions, read_task, subsample, task_dir)

GLUE_ZIP = "https://dl.fbaipublicfiles.com/glue/data/"
AI2 = "https://ai2-public-datasets.s3.amazonaws.com/"
MOSAIC = "https://storage.googleapis.com/ai2-mosaic/public/"
SENTEVAL = "https://dl.fbaipublicfiles.com/senteval/senteval_data/"
# task -> original files (URL, or (URL, file name)); zips unpack flat, only members under ZIP_KEEP[task] if given
URLS = {
    "sst2": [GLUE_ZIP + "SST-2.zip"], "cola": [GLUE_ZIP + "CoLA.zip"], "qqp": [GLUE_ZIP + "QQP-clean.zip"],
    "mnli": [GLUE_ZIP + "MNLI.zip"], "qnli": [GLUE_ZIP + "QNLIv2.zip"], "rte": [GLUE_ZIP + "RTE.zip"],
    "mrpc": [SENTEVAL + "msr_paraphrase_train.txt", SENTEVAL + "msr_paraphrase_test.txt",
             ("https://firebasestorage.googleapis.com/v0/b/mtl-sentence-representations.appspot.com/o/data%2F"
              "mrpc_dev_ids.tsv?alt=media&token=ec5c0836-31d5-48f4-b431-7480817f1adc", "dev_ids.tsv")],
    "boolq": ["https://storage.googleapis.com/boolq/train.jsonl", "https://storage.googleapis.com/boolq/dev.jsonl"],
    "piqa": [f"https://yonatanbisk.com/piqa/data/{f}"
             for f in ("train.jsonl", "train-labels.lst", "valid.jsonl", "valid-labels.lst")],
    "siqa": [MOSAIC + "socialiqa/socialiqa-train-dev.zip"],
    "hellaswag": [f"https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{s}.jsonl"
                  for s in ("train", "val")],
    "winogrande": [MOSAIC + "winogrande/winogrande_1.1.zip"],
    "arc-easy": [AI2 + "arc/ARC-V1-Feb2018.zip"], "arc-challenge": [AI2 + "arc/ARC-V1-Feb2018.zip"],
    "openbookqa": [AI2 + "open-book-qa/OpenBookQA-V1-Sep2018.zip"],
    "gsm8k": [f"https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/{s}.jsonl"
              for s in ("train", "test")],
}
ZIP_KEEP = {"mnli": "MNLI/", "arc-easy": "ARC-Easy/", "arc-challenge": "ARC-Challenge/", "openbookqa": "Data/Main/"}
BBH_URL = "https://raw.githubusercontent.com/suzgun/BIG-Bench-Hard/main/bbh/{}.json"


def fetch(url, path):
    """Download url to path atomically (system.write_atomic), unless it exists."""
    def save(tmp):
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f)
    if not path.exists():
        write_atomic(path, save)
    return path


def download(task, source):
    """Fetch one task's original files into source/<suite>/<task dir>/ (archives kept in source/_archives)."""
    d = task_dir(source, task)
    for entry in [BBH_URL.format(task)] if task in SUITES["bbh"] else URLS[task]:
        url, name = entry if isinstance(entry, tuple) else (entry, entry.rsplit("/", 1)[-1])
        if not name.endswith(".zip"):
            fetch(url, d / name)
            continue
        with zipfile.ZipFile(fetch(url, Path(source) / "_archives" / name)) as z:
            for m in z.namelist():
                base = m.rsplit("/", 1)[-1]
                if base and not base.startswith(".") and ZIP_KEEP.get(task, "") in m and not (d / base).exists():
                    write_atomic(d / base, z.read(m))


def empty_hint(d):
    """'; <files> empty ...' for the empty files in a task directory (a truncated download), else ''."""
    empty = [p.name for p in sorted(Path(d).glob("*")) if p.is_file() and p.stat().st_size < 4096
             and not p.read_bytes().strip()]
    if not empty:
        return ""
    one = len(empty) == 1
    return (f"; {', '.join(empty)} {'is' if one else 'are'} empty (a truncated download?): delete or replace "
            f"{'it' if one else 'them'} (WinoGrande then reads the next train size down)")


def main():
    default_source = REPO.parent / "shared" / "data"
    p = argparse.ArgumentParser(description="Write data/<suite>/<task>-<split>.jsonl from the original files.")
    p.add_argument("suite", choices=list(SUITES), help="task suite to prepare")
    p.add_argument("--source", type=Path, default=default_source if default_source.is_dir() else None,
                   help="directory holding <suite>/<task>/ original files (default: ../shared/data if present, "
                        "else download into ~/.cache/nanoalign/data)")
    p.add_argument("--out", type=Path, default=REPO / "data", help="output root (default: data/)")
    p.add_argument("--tasks", default=None, help="comma list of tasks of the suite (default: all)")
    p.add_argument("--seed", type=int, default=42, help="seed of the caps' subsampling and of single-split splits")
    p.add_argument("--no-caps", action="store_true", help="keep every training example (ignore TRAIN_CAPS)")
    args = p.parse_args()

    tasks = SUITES[args.suite] if args.tasks is None else [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in SUITES[args.suite]]
    if bad:
        sys.exit(f"error: {', '.join(bad)} not in suite {args.suite} ({', '.join(SUITES[args.suite])})")
    source = args.source
    if source is None and args.suite != "builtin":
        source = Path.home() / ".cache" / "nanoalign" / "data"
        print(f"no --source given: downloading the original files into {source}")
        for t in tasks:
            try:
                download(t, source)
            except (OSError, zipfile.BadZipFile) as e:  # URLError, HTTP errors and timeouts are OSErrors
                sys.exit(f"error: downloading {t} failed ({e}); pass --source DIR with the original files")

    written = 0
    formats = ["label"] if args.suite in LABEL_ONLY else FORMATS
    for t in tasks:
        dev_at = None  # chosen on the label rows, reused for cloze: the caps' draw depends on the row count only
        for fmt in formats:
            if args.suite == "builtin":
                splits = {s: builtin_examples(t, s) for s in ("train", "test")}
            else:
                try:
                    splits = read_task(t, source, seed=args.seed, fmt=fmt)
                except FileNotFoundError as e:
                    print(f"skip {t}: {e}")
                    break
                except ValueError as e:  # a malformed file: the message names it (and the line)
                    sys.exit(f"error: {e}{empty_hint(task_dir(source, t))}")
                empty = [s for s, rows in splits.items() if not rows]
                if empty:
                    d = task_dir(source, t)
                    sys.exit(f"error: {t}: no {empty[0]} examples in {d}{empty_hint(d)}")
            pool = splits.pop("dev", [])  # an official held-out split: the dev pool when the cap leaves nothing out
            if "train" in splits and not args.no_caps:
                full, cap = splits["train"], TRAIN_CAPS.get(t)
                splits["train"] = subsample(full, cap, seed=args.seed, salt=t)
                kept = set(subsample(range(len(full)), cap, seed=args.seed, salt=t))  # the same draw, on positions
                pool = [ex for i, ex in enumerate(full) if i not in kept] or pool
            if dev_at is None:
                dev_at = dev_positions(pool, splits.get("train", []) + splits.get("test", []), seed=args.seed,
                                       salt=f"{t}/dev")
                if not dev_at and args.suite not in LABEL_ONLY:
                    print(f"no dev split for {t}: its cap keeps every training row and it has no other held-out split")
            if dev_at:
                splits["dev"] = [pool[i] for i in dev_at]
            for split, rows in splits.items():
                path = data_file(args.out, t, split, fmt)
                write_jsonl(path, tqdm(rows, desc=f"{t}-{split} ({fmt})", unit="row", leave=False))
                print(f"wrote {path} ({len(rows)} rows)")
                written += 1
    if written == 0:
        sys.exit(f"error: no {args.suite} task found under {source}; pass --source DIR with the original files")


if __name__ == "__main__":
    main()
