"""Tiny stand-ins for the evaluation data sets, with the real column names and file layouts.

Each builder writes under ``root`` (a pytest ``tmp_path``) what the matching ``conf/eval`` preset reads from
``eval.data_root``: Hugging Face parquet snapshots (``<folder>/data/data-00000-of-00001.parquet`` with an
``image`` struct column ``{"bytes", "path"}``) for the Marqo fashion / e-commerce sets, and the Marqo-GS-10M
release layout (split CSVs + corpus JSON + image files). Images are 16 px squares whose colour encodes the
category, so a model could in principle separate them; texts repeat category words.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

PALETTE = [(200, 30, 30), (30, 160, 60), (40, 60, 200), (220, 200, 40), (150, 60, 170), (30, 170, 170)]


def png(color: tuple[int, int, int], size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def write_hf_parquet(folder: Path, rows: list[dict], image_key: str = "image", row_group_size: int = 7) -> Path:
    """Rows (with raw PNG bytes under ``image_key``) -> ``folder/data/data-00000-of-00001.parquet`` (HF layout)."""
    out = folder / "data" / "data-00000-of-00001.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    recs = [{**r, image_key: {"bytes": r[image_key], "path": None}} for r in rows]
    table = pa.Table.from_pylist(recs)
    # Small row groups: the image pass works per row group, so tests cross group boundaries.
    pq.write_table(table, out, row_group_size=row_group_size)
    return out


# ------------------------------------------------------------------------------------- marqo_fashion

def _fashion_rows(n: int, cols: dict[str, list[str]], text: bool, str_ids: bool = False,
                  images_per_item: int = 1) -> list[dict]:
    rows = []
    first = next(iter(cols))
    for i in range(n):
        r: dict = {}
        for c, vals in cols.items():
            r[c] = vals[i % len(vals)]
        cat = cols[first][i % len(cols[first])]
        r["image"] = png(PALETTE[i % len(cols[first]) % len(PALETTE)])
        if text:
            r["text"] = f"{r.get('color', r.get('baseColour', 'plain'))} {cat} number {i}"
        item = i // images_per_item  # several rows (views) of one item, as DeepFashion-InShop has
        r["item_ID"] = f"{100000 + item}_{item % 3}" if str_ids else 1000 + item
        rows.append(r)
    return rows


FASHION = {  # folder -> (columns with a few values each, has text)
    "atlas": ({"category": ["ethnic wear", "western wear"], "sub-category": ["kurtas", "sarees", "tops"],
               "gender": ["women", "men"]}, True),
    "deepfashion-inshop": ({"category1": ["women", "men"], "category2": ["dresses", "tees", "jackets"],
                            "category3": ["coats", "blouses", "shorts", "skirts"], "color": ["red", "green", "blue"]},
                           True),
    "deepfashion-multimodal": ({"category2": ["tees", "pants", "dresses"]}, True),
    "fashion200k": ({"category1": ["dresses", "tops", "pants"], "category2": ["cocktail", "casual", "maxi", "mini"],
                     "category3": ["lace", "floral", "striped", "plain", "silk"]}, True),
    "iMaterialist": ({"category": ["dress", "shirt", "skirt"], "style": ["casual", "formal"],
                      "neckline": ["v-neck", "round", "collar"], "gender": ["women", "men"], "color": ["red", "blue"],
                      "material": ["cotton", "silk"], "sleeve": ["long", "short"], "pattern": ["solid", "check"]},
                     False),
    "KAGL": ({"category1": ["apparel", "footwear"], "category2": ["topwear", "shoes", "bottomwear"],
              "category3": ["tshirts", "sneakers", "jeans", "shirts"], "baseColour": ["black", "white", "navy"],
              "season": ["summer", "winter"], "usage": ["casual", "sports"], "gender": ["men", "women"]}, True),
    "polyvore": ({"category": ["Day Dresses", "Boots", "Handbags", "Sunglasses"]}, True),
}


# Marqo-FashionCLIP's ground-truth files: HF folder -> (its data/ folder name, [(query column, doc columns)])
FASHION_GT = {
    "atlas": ("Atlas", [("text", "image"), ("sub-category", "image+text")]),
    "deepfashion-inshop": ("DeepFashion-InShop", [("text", "image"), ("category2", "image+text"),
                                                  ("category3", "image+text"), ("color", "image+text")]),
    "deepfashion-multimodal": ("DeepFashion-Multimodal", [("text", "image"), ("category2", "image+text")]),
    "fashion200k": ("Fashion200k", [("text", "image"), ("category1", "image+text"), ("category2", "image+text"),
                                    ("category3", "image+text")]),
    "iMaterialist": ("iMaterialist", [("category", "image"), ("style", "image"), ("neckline", "image")]),
    "KAGL": ("KAGL", [("text", "image"), ("category1", "image+text"), ("category2", "image+text"),
                      ("category3", "image+text"), ("baseColour", "image+text"), ("season", "image+text"),
                      ("usage", "image+text")]),
    "polyvore": ("Polyvore", [("text", "image"), ("category", "image+text")]),
}


def build_marqo_fashion(root: Path, n: int = 18) -> Path:
    """The seven Marqo fashion sets with their real columns, ``n`` rows each (DeepFashion-InShop: two images per
    item), and Marqo-FashionCLIP's ground-truth files ``marqo-FashionCLIP/data/<Set>/gt_query_doc/`` built the
    way the repository's are: every value of the query column -> the item_IDs of its rows."""
    for folder, (cols, text) in FASHION.items():
        rows = _fashion_rows(n, cols, text, str_ids=folder == "polyvore",
                             images_per_item=2 if folder == "deepfashion-inshop" else 1)
        write_hf_parquet(root / folder, rows)
        name, gts = FASHION_GT[folder]
        for col, docs in gts:
            gt: dict[str, dict[str, int]] = {}
            for r in rows:
                gt.setdefault(r[col], {})[str(r["item_ID"])] = 1
            out = root / "marqo-FashionCLIP" / "data" / name / "gt_query_doc" / f"ground_truth_{col}-{docs}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(gt))
    return root


# ----------------------------------------------------------------------------------- marqo_ecommerce

def build_marqo_ecommerce(root: Path, products: int = 16) -> Path:
    """GoogleShopping (rows = (query, product); products repeat across queries) and AmazonProducts."""
    queries = ["running shoes", "leather bag", "wool hat"]
    rows = []
    for p in range(products):
        for q in (queries[p % 3], queries[(p + 1) % 3]) if p % 4 == 0 else (queries[p % 3],):
            rows.append({"image": png(PALETTE[p % 3]), "item_ID": f"gs{p}", "query": q,
                         "title": f"{queries[p % 3].split()[1]} model {p}", "position": p % 5 + 1})
    write_hf_parquet(root / "google-shopping-general-eval", rows)
    amazon = [{"image": png(PALETTE[p % 4]), "item_ID": f"B0{p:04d}", "title": f"amazon product {p} kind {p % 4}"}
              for p in range(products)]
    write_hf_parquet(root / "amazon-products-eval", amazon)
    return root


# -------------------------------------------------------------------------------------- marqo_gs10m

SPLITS = {"query_0_product_id_0": "corpus_1", "query_1_product_id_0": "corpus_1",
          "query_0_product_id_1": "corpus_2", "query_1_product_id_1": "corpus_2"}


def build_marqo_gs10m(root: Path, subset: str = "marqo_gs_full_10m", products: int = 12, queries: int = 6) -> Path:
    """``marqo-gs-dataset/<subset>/{split}.csv`` + ``corpus_{1,2}.json`` and images in ``images/``.

    Corpus image paths are GCL-style absolute paths of another machine, so the loader must find them by
    file name under ``image_root`` (GCL's change_image_paths fix-up).
    """
    base = root / "marqo-gs-dataset" / subset
    base.mkdir(parents=True, exist_ok=True)
    img_dir = root / "images"
    img_dir.mkdir(exist_ok=True)
    for corpus in ("corpus_1", "corpus_2"):
        docs = {}
        for p in range(products):
            pid = f"{corpus}-p{p}"
            (img_dir / f"{pid}.png").write_bytes(png(PALETTE[p % len(PALETTE)]))
            docs[pid] = {"title": f"product {p} of {corpus}", "image_local": f"/MarqoData/images_wfash/{pid}.png"}
        (base / f"{corpus}.json").write_text(json.dumps(docs))
    for s, (split, corpus) in enumerate(SPLITS.items()):
        rows = []
        for q in range(queries):
            for rank in range(1, 5):  # 4 ranked products per query, linear scores
                p = (q * 3 + rank + s) % products
                rows.append({"query": f"query {q} of {split}", "product_id": f"{corpus}-p{p}",
                             "position": rank, "score_linear": 100 - 20 * rank, "score_reciprocal": 1.0 / rank,
                             "title": f"product {p} of {corpus}",
                             "image_local": f"/MarqoData/images_wfash/{corpus}-p{p}.png"})
        rows.append({"query": f"query 0 of {split}", "product_id": "not-in-corpus", "position": 5,
                     "score_linear": 5, "score_reciprocal": 0.2, "title": "gone", "image_local": ""})
        pd.DataFrame(rows).to_csv(base / f"{split}.csv", index=False)
    return root
