"""`vip2clip download-authors {mvtec,visa} --out DIR`: the authors' released weights as a model folder.

    vip2clip download-authors mvtec --out vip2clip-mvtec     # trained on MVTec AD: for anything that is not MVTec AD
    vip2clip download-authors visa --out vip2clip-visa       # trained on VisA: for MVTec AD
    python -m modeling_vip2clip.cli.download_authors mvtec --out vip2clip-mvtec   # the same, without the dispatcher

Downloads (once) the pinned file from the authors' repository, checks its git blob id, converts it with the CLIP
(`--clip`, default openai/clip-vit-large-patch14-336) and copies the cached folder to `--out` (a complete Hub
folder, `weights.folder.copy_model_folder`): the same files as
`hub/authors_checkpoint_to_folder.py` writes from the same `.pth`. The work is done by `authors_checkpoint`.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from ..weights.authors_release import (
    AUTHORS_COMMIT,
    AUTHORS_REPOSITORY,
    DEFAULT_CLIP,
    LOGGER,
    PAPER,
    RELEASES,
    download_authors_checkpoint,
    get_release,
)
from ..errors import UsageError
from ..weights.folder import copy_model_folder
from .options import add_debug_argument, positive_int
from .boundary import entry_point_main
from ..console import show_progress_lines

__all__ = ["DESCRIPTION", "add_arguments", "run", "main"]

DESCRIPTION = "download the authors' released weights (mvtec or visa), verify them and save a model folder"

_EPILOG = "\n".join(
    [textwrap.fill(f"{r.name}: {r.filename}, {r.summary}.", 100, subsequent_indent="    ") for r in RELEASES.values()]
    + [""]
    + textwrap.wrap(
        f"The file is fetched from {AUTHORS_REPOSITORY} at commit {AUTHORS_COMMIT[:12]}, checked against its git "
        "blob id, converted and cached in $HF_HOME/vip2clip/authors, so a second run needs no network. The weights "
        f"are the authors'; this project does not redistribute them. Cite the paper ({PAPER}).", 100,
    )
)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "name", choices=sorted(RELEASES),
        help="mvtec: trained on MVTec AD, use it on anything that is not MVTec AD; visa: trained on VisA, use it on "
        "MVTec AD",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="model folder to write (must not exist, or be empty)")
    parser.add_argument("--clip", default=DEFAULT_CLIP, metavar="ID_OR_DIR",
                        help=f"CLIP Hub id or folder at its native resolution (default {DEFAULT_CLIP})")
    parser.add_argument("--url", default=None, help="download from this URL instead (a mirror, a test server)")
    parser.add_argument("--git-blob-sha1", default=None, metavar="HEX",
                        help="the git blob id the file must have (default: the pinned id of NAME)")
    parser.add_argument("--image-size", type=positive_int, default=518, metavar="N",
                        help="input size, a multiple of the CLIP's patch (default 518)")
    parser.add_argument("--feature-layers", type=positive_int, nargs="+", default=[6, 12, 18, 24], metavar="L",
                        help="1-based CLIP blocks whose patch features are scored (default 6 12 18 24)")
    parser.add_argument("--top-k", type=positive_int, default=50, metavar="K",
                        help="patches per layer behind the image score (default 50)")
    add_debug_argument(parser)
    parser.epilog = _EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def run(args: argparse.Namespace) -> int:
    """Copy the cached converted folder to `--out`; on any failure nothing is written there."""
    release = get_release(args.name)
    out = Path(args.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} exists and is not an empty folder; pass a new folder name")
    show_progress_lines(LOGGER.name)
    model_dir = download_authors_checkpoint(
        release.name, clip=args.clip, image_size=args.image_size, feature_layers=args.feature_layers,
        top_k=args.top_k, url=args.url, git_blob_sha1=args.git_blob_sha1,
    )
    # A copy, not links (re-saving --out must never write into the cache), through the one model-folder writer.
    copy_model_folder(model_dir, out)
    from ..configuration_vip2clip import ViP2CLIPConfig

    config = ViP2CLIPConfig.from_pretrained(out)
    print(f"saved {out}: the authors' {release.filename} ({release.summary})")
    print(f"  n_ctx={config.n_ctx} n_cls={config.n_cls} image_size={config.image_size} "
          f"feature_layers={config.feature_layers} top_k={config.top_k}; cached in {model_dir}")
    print(f"  use it: AutoModel.from_pretrained({str(out)!r}, trust_remote_code=True), or python demo/app.py --model {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modeling_vip2clip.cli.download_authors", description=DESCRIPTION)
    return entry_point_main(run, add_arguments(parser), argv)


if __name__ == "__main__":
    sys.exit(main())
