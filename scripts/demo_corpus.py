#!/usr/bin/python3
"""Builds the demo corpus: real sound effects from Debian packages, captioned from the curated
category table data/demo/categories.json, split train / val / test by clip.

    scripts/demo_corpus.py --cache DIR --out DIR [--source 0ad-data] [--max-per-category N]

DIR/debs holds the downloaded packages (apt-get download, nothing is installed), DIR/unpacked
what was taken out of them; a rerun reuses both. OUT gets clips/ (copies with unique names),
train.jsonl / val.jsonl / test.jsonl manifests ({"media", "captions", "category", "source"}),
train_captions.txt and val_captions.txt (the language model's text) and SOURCES.csv (package,
path inside it and licence of every clip). Every test and validation category also has
training clips. Standard library only.
"""
import argparse
import csv
import fnmatch
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def say(msg):
    print(f"corpus: {msg}", flush=True)


def fail(msg, code=1):
    print(f"demo_corpus: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


NO_DOWNLOAD = 3  # exit status when a package cannot be downloaded (scripts/test.sh tells it apart)


def need_space(path, gib):
    os.makedirs(path, exist_ok=True)
    free = shutil.disk_usage(path).free / 2**30
    if free < gib:
        fail(f"{path}: {free:.1f} GiB free, {gib:.1f} GiB needed. Free some space (or point --cache "
             f"elsewhere) and rerun; what was already downloaded is kept.")


def download(package, debs):
    found = sorted(glob.glob(os.path.join(debs, f"{package}_*.deb")))
    if found:
        say(f"have {os.path.basename(found[-1])}")
        return found[-1]
    need_space(debs, 2.0 if package == "0ad-data" else 0.3)
    say(f"downloading {package} with apt-get download (0ad-data is 1.4 GB) ...")
    r = subprocess.run(["apt-get", "download", package], cwd=debs, stderr=subprocess.PIPE, text=True)
    found = sorted(glob.glob(os.path.join(debs, f"{package}_*.deb")))
    if r.returncode != 0 or not found:
        err = (r.stderr or "").strip().splitlines()
        detail = next((l for l in err if l.startswith("E:")), err[-1] if err else "")
        fail(f"could not download {package}: {detail}\n"
             f"  No network, or no Debian package source for it? Check `apt-get download {package}` by hand,\n"
             f"  or copy {package}_*.deb into {debs}/ and rerun.", NO_DOWNLOAD)
    for part in glob.glob(os.path.join(debs, "*.deb.part")):
        os.remove(part)
    return found[-1]


def unpack(source, deb, unpacked):
    dest = os.path.join(unpacked, source["package"])
    stamp = os.path.join(dest, ".complete")
    if os.path.exists(stamp):
        say(f"have {dest}")
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    try:
        if "archive" in source:  # 0ad-data: one zip inside the package; take its audio only
            need_space(unpacked, 3.6)
            say(f"extracting {source['archive']} from the package (3.3 GB, about a minute) ...")
            tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", deb], stdout=subprocess.PIPE)
            r = subprocess.run(["tar", "-x", "-C", dest, "./" + source["archive"], "./" + source["copyright"]],
                               stdin=tar.stdout)
            tar.stdout.close()
            if tar.wait() != 0 or r.returncode != 0:
                fail(f"could not extract {source['archive']} from {deb} (disk full? a damaged download? "
                     f"delete {deb} to fetch it again)")
            zpath = os.path.join(dest, source["archive"])
            say("unzipping the sound effects ...")
            r = subprocess.run(["unzip", "-q", "-o", zpath, *source["archive_members"], "-d", dest])
            if r.returncode not in (0, 1):
                fail(f"unzip failed on {zpath} (exit {r.returncode})")
            os.remove(zpath)  # 3.3 GB we no longer need
        else:
            r = subprocess.run(["dpkg-deb", "-x", deb, dest])
            if r.returncode != 0:
                fail(f"could not unpack {deb} (disk full? a damaged download? delete it to fetch it again)")
    except OSError as e:
        fail(f"unpacking {deb}: {e}")
    open(stamp, "w").close()
    return dest


def stable_key(text, seed):
    return hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()


def main():
    ap = argparse.ArgumentParser(description="Build the demo corpus from Debian packages.")
    ap.add_argument("--cache", required=True, help="downloads and unpacked packages (kept between runs)")
    ap.add_argument("--out", required=True, help="corpus folder to write")
    ap.add_argument("--source", default="0ad-data", help="package of the table to use (0ad-data, sonic-pi-samples)")
    ap.add_argument("--table", default=os.path.join(ROOT, "data", "demo", "categories.json"))
    ap.add_argument("--max-per-category", type=int, default=0, help="fewer clips per category (0 = the table's max_clips)")
    ap.add_argument("--max-categories", type=int, default=0, help="only the first N categories (0 = all)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    with open(a.table) as f:
        table = json.load(f)
    if a.source not in table["sources"]:
        fail(f"unknown source {a.source} (the table has {', '.join(table['sources'])})")
    source = table["sources"][a.source]
    categories = [c for c in table["categories"] if c["source"] == a.source]
    if a.max_categories:
        categories = categories[: a.max_categories]
    cap = a.max_per_category or table["max_clips"]

    settings = {"source": a.source, "max_per_category": cap, "max_categories": a.max_categories, "seed": a.seed,
                "table_sha256": hashlib.sha256(open(a.table, "rb").read()).hexdigest()}
    try:
        with open(os.path.join(a.out, "corpus.json")) as f:
            if json.load(f).get("settings") == settings:
                say(f"have {a.out}")
                return
    except (OSError, ValueError):
        pass

    debs = os.path.join(a.cache, "debs")
    os.makedirs(debs, exist_ok=True)
    deb = download(source["package"], debs)
    tree = unpack(source, deb, os.path.join(a.cache, "unpacked"))
    root = os.path.join(tree, source["root"])

    files = sorted(os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(root) for n in names
                   if n.lower().endswith((".ogg", ".wav", ".flac")))
    taken, chosen = set(), {}
    for c in categories:
        clips = [p for p in files if p not in taken and any(fnmatch.fnmatch(p, m) for m in c["match"])]
        clips = sorted(clips, key=lambda p: stable_key(p, a.seed))[:cap]
        taken.update(clips)
        if clips:
            chosen[c["name"]] = (c, clips)
        else:
            say(f"warning: category {c['name']} matched no clip")

    clips_dir = os.path.join(a.out, "clips")
    shutil.rmtree(a.out, ignore_errors=True)
    os.makedirs(clips_dir)
    splits = {"train": [], "val": [], "test": []}
    sources = []
    for name, (c, clips) in chosen.items():
        n = len(clips)
        n_test = max(1, round(n * 0.15)) if n >= 3 else 0
        n_val = max(1, round(n * 0.1)) if n >= 5 else 0
        for i, rel in enumerate(clips):
            split = "test" if i < n_test else "val" if i < n_test + n_val else "train"
            dst = f"{name}__{rel.replace('/', '_')}"
            shutil.copyfile(os.path.join(root, rel), os.path.join(clips_dir, dst))
            src_path = os.path.join(source["root"], rel) if "archive" not in source else f"{source['archive']}!{source['root']}/{rel}"
            splits[split].append({"media": f"clips/{dst}", "captions": c["captions"], "category": name,
                                  "source": {"package": source["package"], "path": src_path, "licence": source["licence"]}})
            sources.append([f"clips/{dst}", source["package"], src_path, source["licence"], split])
    for split, items in splits.items():
        with open(os.path.join(a.out, f"{split}.jsonl"), "w") as f:
            for it in items:
                f.write(json.dumps(it) + "\n")
    for split in ("train", "val"):
        with open(os.path.join(a.out, f"{split}_captions.txt"), "w") as f:
            for it in splits[split]:
                for cap_text in it["captions"]:
                    f.write(cap_text + "\n")
    with open(os.path.join(a.out, "SOURCES.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["clip", "package", "path_in_package", "licence", "split"])
        w.writerows(sources)
    copyright_file = os.path.join(tree, source["copyright"])
    if os.path.exists(copyright_file):
        shutil.copyfile(copyright_file, os.path.join(a.out, f"COPYRIGHT.{source['package']}"))
    summary = {"source": source["package"], "categories": len(chosen),
               **{f"{k}_clips": len(v) for k, v in splits.items()}, "settings": settings}
    with open(os.path.join(a.out, "corpus.json"), "w") as f:
        json.dump(summary, f, indent=1)
    say(f"{summary['train_clips']} training, {summary['val_clips']} validation and {summary['test_clips']} test clips "
        f"in {len(chosen)} categories from {source['package']} ({source['licence']}) -> {a.out}")


if __name__ == "__main__":
    main()
