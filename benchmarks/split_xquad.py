"""Split XQuAD-English (../shared/data/xquad_en/validation.jsonl) by article into train and
validation files outside the project tree, so no question's paragraph is seen in training.

    .venv/bin/python benchmarks/split_xquad.py OUT_DIR [--validation-articles 8]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--source", default=str(ROOT.parent / "shared" / "data" / "xquad_en" / "validation.jsonl"))
    parser.add_argument("--validation-articles", type=int, default=8)
    args = parser.parse_args()
    rows = [json.loads(line) for line in Path(args.source).read_text(encoding="utf-8").splitlines() if line]
    titles = list(dict.fromkeys(r["title"] for r in rows))  # source order
    held = set(titles[-args.validation_articles :])
    out = Path(args.out_dir)
    parts = {
        "train": [r for r in rows if r["title"] not in held],
        "validation": [r for r in rows if r["title"] in held],
    }
    texts = {name: "".join(json.dumps(r) + "\n" for r in part) for name, part in parts.items()}
    for name, text in texts.items():  # an existing file is left alone unless it is this very split
        path = out / f"{name}.jsonl"
        if path.exists() and (not path.is_file() or path.read_text(encoding="utf-8") != text):
            parser.error(f"{path} exists and holds something else; nothing was changed, name another folder")
    out.mkdir(parents=True, exist_ok=True)
    for name, part in parts.items():
        (out / f"{name}.jsonl").write_text(texts[name], encoding="utf-8")
        print(f"{name}: {len(part)} questions, {len({r['title'] for r in part})} articles")


if __name__ == "__main__":
    main()
