"""Colour-histogram retrieval on the synthetic dataset: how hard is it?

Generates the synthetic street/shop set for a few seeds into a temporary
folder, embeds the val street photos and the shop photos with an HSV colour
histogram, and prints top-k accuracy (street -> shop, by product), with the
street photos cropped to their box and uncropped.

    .venv/bin/python tools/synth_histogram_baseline.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import tempfile
import time

from street2shop.baselines import colour_histogram_embeddings, top_k_accuracy
from street2shop.data.synthetic import generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--products", type=int, default=40)
    parser.add_argument("--street-per-product", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=160)
    args = parser.parse_args()
    ks = (1, 5)
    print(f"products={args.products} street_per_product={args.street_per_product} image_size={args.image_size}")
    print(f"chance top-1 = {1 / args.products:.3f}, top-5 = {min(1.0, 5 / args.products):.3f}")
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            records = generate(
                tmp,
                products=args.products,
                street_per_product=args.street_per_product,
                image_size=args.image_size,
                seed=seed,
            )
            took = time.perf_counter() - start
            queries = records.filter(split="val", domain="street").records
            shop = records.filter(domain="shop").records
            gallery = colour_histogram_embeddings(shop)
            line = [f"seed={seed} ({len(queries)} val street vs {len(shop)} shop, generated in {took:.1f}s):"]
            for crop in (True, False):
                q = colour_histogram_embeddings(queries, crop_to_box=crop)
                acc = top_k_accuracy(
                    q, [r.product_id for r in queries], gallery, [r.product_id for r in shop], ks=ks
                )
                name = "box" if crop else "full"
                line.append(f"{name}: top1={acc[1]:.3f} top5={acc[5]:.3f}")
            print("  ".join(line))


if __name__ == "__main__":
    main()
