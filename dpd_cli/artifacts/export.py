"""What ``dpd export`` writes (docs/formats.md, "Exports"): one writer per format, README.txt and export.json.

``mtt`` / ``datm`` write ``images_best.pt`` and ``labels_best.pt`` (the names MTT's and DATM's distill scripts
give their best set), ``lr_best.pt`` (DATM's file for alpha: MTT saves no learning rate, and none of MTT's
scripts loads a saved set) plus the preprocessing (``zca.pt``: a kornia ``ZCAWhitening`` state dict;
``normalization.pt``). ``mtt`` stores hard labels as int64 class indices (a set with soft labels is refused
by the recipe), ``datm`` as ``[n, K]`` float32 logits (0 at the class, ``-HARD_LABEL_GAP`` elsewhere: their
softmax is exactly the one-hot label), or the learned soft labels' logits.
``imagefolder`` writes 8-bit PNGs, ``npz`` every tensor as a NumPy array (readable without unpickling).
Writers fill a folder the caller made, each file written atomically.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dpd_cli.data import Preprocess
from dpd_cli.io import storage
from dpd_cli.text import plural

FORMAT = "dpd.export"
RECORD = "export.json"
README = "README.txt"
NPZ = "synthetic.npz"
#: datm: the logit of every other class for a hard label; softmax(-1000) is 0 in float32 and float64.
HARD_LABEL_GAP = 1000.0
_TORCH_NAMES = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "tiny-imagenet": "Tiny"}


def write_torch(folder: Path, flavour: str, t: dict, pre: Preprocess, meta: dict, logits) -> tuple[list[str], None]:
    """The ``mtt`` or ``datm`` files; returns their names."""
    if logits is not None:
        y = logits.float()
    elif flavour == "datm":  # logits 0 at the class, -HARD_LABEL_GAP elsewhere
        y = torch.full((len(t["labels"]), len(meta["classes"])), -HARD_LABEL_GAP, dtype=torch.float32)
        y[torch.arange(len(y)), t["labels"].long()] = 0.0
    else:
        y = t["labels"].long()
    p = pre.tensors()
    files = {
        "images_best.pt": t["images"].detach().float(),
        "labels_best.pt": y,
        "lr_best.pt": t["lr"].detach().float().reshape(()),
        "normalization.pt": {"mean": p["norm_mean"], "std": p["norm_std"]},
    }
    if pre.has_zca:
        # kornia's ZCAWhitening computes (x - mean_vector) @ transform_matrix on flattened images, as dpd does.
        zca = {"mean_vector": p["zca_mean"].reshape(1, -1), "transform_matrix": p["zca_matrix"]}
        files["zca.pt"] = {**zca, "transform_inv": p["zca_inverse"]}
    for name, obj in files.items():
        with storage.atomic_write(folder / name) as f:
            torch.save(obj.cpu().contiguous() if isinstance(obj, torch.Tensor) else obj, f)
    return list(files), None


def write_npz(folder: Path, fmt: str, t: dict, pre: Preprocess, meta: dict, logits) -> tuple[list[str], None]:
    """``synthetic.npz``: images, labels, lr, preprocessing, [label_logits], classes, meta_json."""
    keys = ["images", "labels", "lr", "norm_mean", "norm_std", "zca_mean", "zca_matrix", "zca_inverse"]
    arrays = {k: t[k].detach().cpu().numpy() for k in keys if k in t}
    if logits is not None:
        arrays["label_logits"] = logits.detach().float().cpu().numpy()
    arrays["classes"] = np.array(list(meta["classes"]), dtype=str)  # a unicode array: np.load reads it without pickle
    # the set's metadata without the format entries (those describe the safetensors file, not the set)
    plain = {k: v for k, v in meta.items() if k not in ("format", "format_version", "dpd_version")}
    arrays["meta_json"] = np.array(json.dumps(plain, sort_keys=True, default=str), dtype=str)
    with storage.atomic_write(folder / NPZ) as f:
        np.savez(f, **arrays)
    return [NPZ], None


def class_folder(k: int, name: str, n_classes: int) -> str:
    """``03-T-shirt_top``, ``9-Ankle_boot``: numbered so that sorted order is class order (image-folder readers sort
    names); characters other than letters, digits, ``.``, ``_`` and ``-`` (spaces, slashes) become ``_``."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "class"
    return f"{k:0{len(str(n_classes - 1))}d}-{safe}"


def write_imagefolder(folder: Path, fmt: str, t: dict, pre: Preprocess, meta: dict, logits) -> tuple[list[str], float]:
    """PNGs ``<NN>-<class>/<i>.png`` (i: the image's index in the set); returns (names, fraction of values clipped)."""
    images, classes = t["images"], list(meta["classes"])
    pixels = pre.invert(images, clamp=False)  # (n, C, H, W), [0, 1] where representable
    clipped = float(((pixels < 0) | (pixels > 1)).float().mean()) if pixels.numel() else 0.0
    arr = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (n, H, W, C)
    width = len(str(len(images) - 1))
    names = []
    for i, (a, y) in enumerate(zip(arr, t["labels"].tolist(), strict=True)):
        name = f"{class_folder(y, classes[y], len(classes))}/{i:0{width}d}.png"
        image = Image.fromarray(a[:, :, 0], "L") if a.shape[2] == 1 else Image.fromarray(a, "RGB")
        with storage.atomic_write(folder / name) as f:
            image.save(f, format="PNG")
        names.append(name)
    if logits is not None:
        with storage.atomic_write(folder / "label_logits.npy") as f:
            np.save(f, logits.detach().float().cpu().numpy())
        names.append("label_logits.npy")
    return names, clipped


def write_record(folder: Path, record: dict) -> None:
    storage.atomic_write_text(folder / RECORD, json.dumps({"format": FORMAT, "format_version": 1, **record}, indent=2))


def read_record(folder: Path) -> dict | None:
    """``export.json`` of ``folder`` if it is one dpd export wrote, else ``None``."""
    try:
        record = json.loads((Path(folder) / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == FORMAT else None


# --- README.txt ---------------------------------------------------------------------------------
def _space(pre: Preprocess, zca_subset: int | None) -> str:
    if pre.has_zca:
        fitted = (
            f"fitted on {plural(zca_subset, 'training image')} per class (--train-per-class)"
            if zca_subset
            else "fitted on the whole training set"
        )
        return (
            "ZCA-whitened: pixels scaled to [0, 1] with no mean/std normalisation, then x -> (x - mean) W, with W "
            f"kornia's ZCAWhitening(eps=0.1) (as MTT's and DATM's code with --zca) {fitted}"
        )
    mean = ", ".join(f"{v:.4g}" for v in pre.mean.tolist())
    std = ", ".join(f"{v:.4g}" for v in pre.std.tolist())
    return f"normalised: pixels scaled to [0, 1], then (x - mean) / std per channel, mean ({mean}), std ({std})"


def readme(fmt: str, info: dict) -> str:
    """README.txt of an export folder; ``info``: source, dataset, classes, ipc, shape, lr, pre, soft, files, ...."""
    pre: Preprocess = info["pre"]
    n, c, h, w = info["shape"]
    k = len(info["classes"])
    head = [
        f"dpd export ({fmt}) of {info['source']}",
        f"Dataset {info['dataset']}: {k} classes, {plural(info['ipc'], 'image')} per class, {plural(n, 'image')} of "
        f"{c}x{h}x{w}; "
        f"learned step size alpha = {info['lr']:.6g}. Written by dpd {info['versions']['dpd']}.",
        "",
        f"The images live in the networks' training space, {_space(pre, info.get('train_per_class'))}. Test images "
        "must be "
        "mapped into the same space before a network trained on these images is tested.",
        "",
        "Files",
    ]
    body = {"mtt": _readme_torch, "datm": _readme_torch, "npz": _readme_npz, "imagefolder": _readme_imagefolder}[fmt](
        fmt, info
    )
    end = body.index("") if "" in body else len(body)  # the list of files ends at the first blank line
    ours = [
        f"  {RECORD}  what was exported, from where, by which dpd (dpd export --force replaces only folders holding "
        "it).",
        f"  {README}  this file.",
    ]
    return "\n".join(w for line in head + body[:end] + ours + body[end:] + [""] for w in _wrap(line))


def _wrap(line: str, width: int = 100) -> list[str]:
    """Prose wrapped at ``width``; a ``  name  description`` entry hangs under its description; code (4+ spaces) kept."""
    if line.startswith("    ") or len(line) <= width:
        return [line]
    m = re.match(r"(  \S+\s{2,})", line)
    indent = " " * len(m.group(1)) if m else ("  " if line.startswith("  ") else "")
    return textwrap.wrap(line, width, subsequent_indent=indent, break_on_hyphens=False, break_long_words=False)


def label_summary(fmt: str | None, soft: bool) -> str:
    """What an export's labels are, in a few words (``dpd inspect`` of an export folder)."""
    if soft:
        return "the learned soft labels, as float32 [n, K] logits"
    if fmt == "datm":
        return f"hard, as float32 [n, K] logits (0 at the class, -{HARD_LABEL_GAP:g} elsewhere)"
    return "hard, as int64 class indices" + (" (and the PNGs' class folders)" if fmt == "imagefolder" else "")


def _label_text(fmt: str, info: dict) -> str:
    k = len(info["classes"])
    if info["soft_labels"]:
        return (
            f"float32 [n, {k}]: the learned soft labels as logits (DATM's labels_best.pt); train with soft "
            "cross-entropy against softmax(logits), as DATM's evaluation.py does. MTT's own code has no soft labels."
        )
    if fmt == "datm":
        return (
            f"float32 [n, {k}]: logits 0 at the image's class and -{HARD_LABEL_GAP:g} elsewhere (DATM stores labels as "
            "logits); their softmax is exactly the one-hot label, so DATM's soft cross-entropy equals the usual one. "
            "Class indices: labels.argmax(1)."
        )
    return "int64 [n]: class indices, class-major (ipc images of class 0, then class 1, ...), as MTT's label_syn."


def _readme_torch(fmt: str, info: dict) -> list[str]:
    pre: Preprocess = info["pre"]
    name = _TORCH_NAMES.get(info["dataset"])
    lines = [
        "  images_best.pt    float32 [n, C, H, W]: the synthetic images, in the training space above.",
        f"  labels_best.pt    {_label_text(fmt, info)}",
        "  lr_best.pt        float32 scalar: alpha, the learned step size; MTT's evaluation trains with lr = alpha "
        "(args.lr_net). DATM saves this file; MTT saves no learning rate (it only logs it).",
        "  normalization.pt  {'mean': [C], 'std': [C]} float32 (0 and 1 with ZCA: no normalisation then).",
    ]
    if pre.has_zca:
        lines.append(
            "  zca.pt            {'mean_vector': [1, D], 'transform_matrix': [D, D], 'transform_inv': [D, D]} float32, "
            "D = C*H*W: the fitted kornia ZCAWhitening, whitened = (x.flatten(1) - mean_vector) @ transform_matrix."
        )
    lines += [
        "",
        "Load (plain PyTorch, no dpd needed)",
        "    import torch",
        "    images = torch.load('images_best.pt', weights_only=True)",
        "    labels = torch.load('labels_best.pt', weights_only=True)",
        "    lr = float(torch.load('lr_best.pt', weights_only=True))",
    ]
    if pre.has_zca:
        lines += [
            "    # the ZCA transform, for test images x in [0, 1] of shape [N, C, H, W]:",
            "    import kornia",
            "    zca = kornia.enhance.ZCAWhitening(eps=0.1, compute_inv=True)",
            "    state = torch.load('zca.pt', weights_only=True)",
            "    zca.load_state_dict(state)   # kornia versions that keep the fit as buffers (e.g. 0.9);",
            "    # older kornia (0.6.3, DATM's environment) keeps it in attributes instead:",
            "    # zca.mean_vector, zca.transform_matrix, zca.transform_inv = state['mean_vector'], "
            "state['transform_matrix'], state['transform_inv']; zca.fitted = True",
            "    x_test = zca(x)",
        ]
    else:
        lines += ["    # test images x in [0, 1]: torchvision.transforms.Normalize(**torch.load('normalization.pt'))"]
    lines.append("")
    if name:
        zca = " --zca" if pre.has_zca else ""
        lines += [
            f"With MTT's or DATM's code (dataset {name}{zca}): their get_dataset fits the same preprocessing on the "
            "dataset "
            "itself (ZCA: kornia, eps 0.1, raw [0, 1] pixels of the whole training set; else CIFAR-10's or ImageNet's "
            "mean/std, as dpd)."
        ]
        if pre.has_zca and info.get("train_per_class"):
            lines.append(
                "This set's ZCA was fitted on a subset of the training set, so theirs differs: map the test images "
                "with zca.pt instead."
            )
        lines += [
            "DATM's evaluation (it needs the datm format's [n, K] labels; DIR is this folder):",
            f"    cd DATM/distill && python evaluation.py --dataset {name}{zca} --data_dir DIR/images_best.pt "
            "--label_dir DIR/labels_best.pt --lr_dir DIR/lr_best.pt",
            "MTT's distill.py saves images_<it>.pt and labels_<it>.pt (and images_best.pt, labels_best.pt) under "
            "logged_files/, but none of MTT's scripts loads them: it evaluates inside distill.py. To use MTT's code, "
            "write a script that loads these files as above, sets args as distill.py does (dsa, dsa_param, "
            "epoch_eval_train, batch_train, device) with args.lr_net = lr, and calls utils.evaluate_synset(0, net, "
            "images, labels, testloader, args) with net = utils.get_network(...); it needs int64 labels: the mtt "
            "format.",
        ]
    else:
        lines.append(
            f"MTT's and DATM's code has no dataset {info['dataset']!r}: load the files as above and map test "
            "images with normalization.pt" + (" and zca.pt." if pre.has_zca else ".")
        )
    return lines


def _readme_npz(fmt: str, info: dict) -> list[str]:
    pre: Preprocess = info["pre"]
    k = len(info["classes"])
    lines = [
        f"  {NPZ}  one NumPy archive (numpy.load reads it without allow_pickle):",
        "    images        float32 [n, C, H, W]  the synthetic images, in the training space above",
        "    labels        int64 [n]             class indices, class-major (ipc images of class 0, then class 1, ...)",
        "    lr            float32 []            alpha, the learned step size (the evaluation learning rate)",
        "    norm_mean     float32 [C]           per-channel mean (0 with ZCA)",
        "    norm_std      float32 [C]           per-channel std (1 with ZCA)",
    ]
    if pre.has_zca:
        lines += [
            "    zca_mean      float32 [D]           D = C*H*W; mean of the flattened [0, 1] training images",
            "    zca_matrix    float32 [D, D]        the whitening matrix W (symmetric)",
            "    zca_inverse   float32 [D, D]        W^-1",
        ]
    if info["soft_labels"]:
        lines.append(
            f"    label_logits  float32 [n, {k}]        learned soft labels as logits (train against softmax(logits))"
        )
    lines += [
        f"    classes       str [{k}]              class names; label k is classes[k]",
        "    meta_json     str []                the synthetic set's metadata as JSON (dataset, model, ipc, settings, "
        "...)",
        "",
        "Load",
        "    import numpy as np",
        f"    z = np.load('{NPZ}')",
        "    images, labels, lr = z['images'], z['labels'], float(z['lr'])",
        "    # a test image x in [0, 1], shape [N, C, H, W], into the training space:",
        "    x = (x - z['norm_mean'][None, :, None, None]) / z['norm_std'][None, :, None, None]",
    ]
    if pre.has_zca:
        lines.append("    x = ((x.reshape(len(x), -1) - z['zca_mean']) @ z['zca_matrix']).reshape(x.shape)")
    return lines


def _readme_imagefolder(fmt: str, info: dict) -> list[str]:
    k = len(info["classes"])
    lines = [
        f"  <NN>-<class>/<i>.png  8-bit PNGs ({'grayscale' if info['shape'][1] == 1 else 'RGB'}), one folder per "
        "class, "
        f"numbered 0..{k - 1} so that sorted folder names give the class indices (as torchvision's ImageFolder assigns "
        "them); i is the image's index in the synthetic set.",
        "",
        "The images were mapped back to pixels (the ZCA undone, de-normalised), clipped to [0, 1] and rounded to 8 "
        "bits: "
        f"{100 * info['pixels_clipped']:.2f} % of the values lay outside [0, 1] and were clipped. A network trained on "
        "these PNGs "
        "must see them through the same preprocessing as above (the learned alpha assumes it), and still sees them "
        "only "
        "up to that rounding and clipping: for exact tensors, use --format npz or mtt.",
    ]
    if info["soft_labels"]:
        lines.append(
            f"  label_logits.npy  float32 [n, {k}]: the learned soft labels as logits, row i for image i (an image "
            "folder can only say the class)."
        )
    return lines
