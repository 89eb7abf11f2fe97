"""Convert the authors' ViP²-CLIP checkpoint + a transformers CLIP into a model folder.

    python hub/convert_official_checkpoint.py --checkpoint mvtec_train_epoch_10.pth \
        --clip openai/clip-vit-large-patch14-336 --out vip2clip-mvtec

The folder then loads with `AutoModel.from_pretrained(DIR, trust_remote_code=True)`.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="authors' .pth file ({'prompt_learner', 'Zero_try'})")
    parser.add_argument("--clip", required=True, help="CLIP Hub id or folder at its native resolution")
    parser.add_argument("--out", required=True, help="output model folder")
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--feature-layers", type=int, nargs="+", default=[6, 12, 18, 24])
    parser.add_argument("--top-k", type=int, default=50)
    args = parser.parse_args(argv)

    from modeling_vip2clip.official_checkpoint import convert_official_checkpoint

    try:
        model = convert_official_checkpoint(
            args.checkpoint, args.clip, args.out,
            image_size=args.image_size, feature_layers=args.feature_layers, top_k=args.top_k,
        )
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    config = model.config
    print(f"saved {args.out}: n_ctx={config.n_ctx} n_cls={config.n_cls} image_size={config.image_size} "
          f"feature_layers={config.feature_layers} top_k={config.top_k}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
