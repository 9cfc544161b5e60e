"""Command line: parses arguments and delegates; no logic lives here.

Every expected failure (a `CrossModalNetError`, a full or read-only disk, a file that is not UTF-8,
a document nested too deeply, memory; see `errors.describe`) is printed as one line `error: ...`
naming the file, exit status 2; `--debug` also prints the traceback. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from pydantic import ValidationError

from crossmodalnet.clitext import ADAPT_DESCRIPTION, ADAPT_EPILOG, EPILOG
from crossmodalnet.config import describe_validation_error
from crossmodalnet.errors import EXPECTED, describe

__all__ = ["main", "build_parser"]


def _cmd_synth(a: argparse.Namespace) -> None:
    from crossmodalnet.data.phantom import synthesize

    synthesize(a.out, cases=a.cases, size=a.size, seed=a.seed, domain=a.domain, layout=a.layout,
               preview=a.preview)


def _cmd_prepare_mmwhs(a: argparse.Namespace) -> None:
    from crossmodalnet.data.mmwhs import prepare_from_cli

    prepare_from_cli(a)


def _cmd_evaluate(a: argparse.Namespace) -> None:
    from crossmodalnet.evaluate import evaluate_paths, resolve_spec

    spec = resolve_spec(a.ref, dataset=a.dataset, run=a.run)
    evaluate_paths(a.pred, a.ref, a.out, spec=spec, hd95=a.hd95, topology=a.topology, split=a.split)


def _cmd_plan(a: argparse.Namespace) -> None:
    from crossmodalnet.train.preflight import plan_from_cli

    plan_from_cli(a)


def _cmd_dataset(a: argparse.Namespace) -> None:
    from crossmodalnet.data.builder import build_from_cli

    build_from_cli(a)


def _cmd_models(a: argparse.Namespace) -> None:
    from crossmodalnet.models.registry import print_models_table

    print_models_table(model_size=a.model_size, edge=a.size, modalities=a.channels)


def _cmd_train(a: argparse.Namespace) -> None:
    from crossmodalnet.train.trainer import train_from_cli

    train_from_cli(a)


def _cmd_adapt(a: argparse.Namespace) -> None:
    from crossmodalnet.train.adapt import adapt_from_cli

    adapt_from_cli(a)


def _cmd_predict(a: argparse.Namespace) -> None:
    from crossmodalnet.infer import predict_from_cli

    predict_from_cli(a)


def _cmd_demo(a: argparse.Namespace) -> None:
    from crossmodalnet.demo import run_demo

    run_demo(out=a.out, minutes=a.minutes, seed=a.seed)


def _cmd_cmif(a: argparse.Namespace) -> None:
    from crossmodalnet.analysis.cmif import cmif_from_cli

    cmif_from_cli(a)


def _cmd_audit(a: argparse.Namespace) -> None:
    from crossmodalnet.analysis.audit import audit_from_cli

    audit_from_cli(a)


def _add_analysis_args(parser: argparse.ArgumentParser, cases: int, estimator: str) -> None:
    """Arguments shared by `cmif` and `audit`."""
    parser.add_argument("run", type=Path, help="run folder (config.yaml, model.safetensors, preprocess.json)")
    parser.add_argument("data", type=Path, help="dataset folder with dataset.json")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--cases", type=int, default=cases, help=f"number of cases to measure (default {cases})")
    parser.add_argument("--split", default=None, help="dataset split (default: test, else validation, else training)")
    parser.add_argument("--estimator", choices=["gaussian", "ksg", "both"], default=estimator,
                        help=f"mutual information estimator (default {estimator})")
    parser.add_argument("--pca-dim", type=int, default=4,
                        help="principal components kept per stream before estimating MI (default 4)")
    parser.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of untrained models, subsampling, probes (default 0)")


def _name_value(text: str) -> tuple[str, str]:
    """`NAME=VALUE` -> (NAME, VALUE), for argparse."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name.strip(), value.strip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="crossmodalnet",
        description="3D multimodal medical image segmentation (1 to 4 co-registered channels: CT + MR, "
                    "cardiac MR sequences, brain MR...) with a cross-modal transformer.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--debug", action="store_true",
                   help="print the traceback of an error as well as its one-line message")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("synth", help="write paired CT/MR heart phantoms (no download needed)",
                       description="Synthesize paired CT/MR whole-heart phantoms with labels.")
    s.add_argument("out", type=Path, help="output folder")
    s.add_argument("--cases", type=int, default=20, help="number of cases (default 20)")
    s.add_argument("--size", type=int, default=96, help="edge length of the CT grid in voxels (default 96)")
    s.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files (default 0)")
    s.add_argument("--domain", choices=["source", "target"], default="source",
                   help="rendering preset: scanner/protocol of the data (default source)")
    s.add_argument("--layout", choices=["dataset", "mmwhs"], default="dataset",
                   help="dataset: registered pairs + dataset.json; mmwhs: raw MM-WHS naming, unregistered")
    s.add_argument("--preview", action="store_true", help="also write preview.png (mid slices, overlays)")
    s.set_defaults(func=_cmd_synth)

    pm = sub.add_parser("prepare-mmwhs", help="pair, register (ANTs SyN), crop and resample raw MM-WHS CT/MR",
                        description="Turn the raw MM-WHS layout (ct_train/ct_train_1001_image.nii.gz, "
                                    "..._label.nii.gz, mr_train/..., optional *_test folders) into a dataset "
                                    "folder: the moving modality registered onto the fixed one, the heart box "
                                    "resampled to SIZE^3 voxels of SPACING mm, dataset.json split by seed, a "
                                    "registration report and a per-case record for mapping predictions back. "
                                    "Resumable: finished cases are skipped.")
    pm.add_argument("raw", type=Path, help="raw MM-WHS folder (ct_train/, mr_train/, [ct_test/, mr_test/])")
    pm.add_argument("out", type=Path, help="output dataset folder")
    pm.add_argument("--fixed", choices=["mr", "ct"], default="mr",
                    help="modality the other is registered onto; its grid and label are kept (default mr)")
    pm.add_argument("--register", choices=["image", "label", "none"], default="image",
                    help="image: affine + SyN on mutual information of the images (default; works without "
                         "labels); label: the same on the label maps (training pairs only); none")
    pm.add_argument("--spacing", type=float, default=1.0, help="voxel size of the prepared grid in mm (default 1.0)")
    pm.add_argument("--size", type=int, default=128, help="edge of the prepared grid in voxels (default 128)")
    pm.add_argument("--margin", type=float, default=10.0, help="margin around the fixed label's box in mm (default 10)")
    pm.add_argument("--split", default="15/5",
                    help="TRAIN/TEST (validation = 20%% of TRAIN) or TRAIN/VAL/TEST, as counts or proportions "
                         "of the labeled pairs (default 15/5)")
    pm.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    pm.add_argument("--workers", type=int, default=2, help="processes, each with its share of the cores (default 2)")
    pm.add_argument("--pairs", type=Path, default=None,
                    help="CSV with columns ct,mr[,id,ct_label,mr_label] (paths relative to RAW) instead of "
                         "pairing by number")
    pm.add_argument("--reg-spacing", type=float, default=2.0,
                    help="voxel size in mm of the grid the registration runs on (default 2.0)")
    pm.add_argument("--syn-iterations", default="60x40x20",
                    help="SyN iterations per level, coarsest first (default 60x40x20)")
    pm.set_defaults(func=_cmd_prepare_mmwhs)

    e = sub.add_parser("evaluate", help="Dice, IoU and HD95 per class, region and case",
                       description="Compare predicted label maps with references (files or folders "
                                   "matched by file name), per class and per region of the dataset. Labels "
                                   "may be the dataset's values or class indices. The labels and regions are "
                                   "those of the dataset.json beside or above REF, or of --dataset / --run.")
    e.add_argument("pred", type=Path, help="predicted label map, or a folder of them")
    e.add_argument("ref", type=Path, help="reference label map, or a folder of them, or a dataset folder (the labels "
                                          "of its --split cases)")
    e.add_argument("--split", default="test", help="split of a dataset folder REF to score (default test)")
    e.add_argument("--out", type=Path, required=True, help="folder for metrics.csv, summary.json, plots")
    e.add_argument("--hd95", choices=["monai", "pooled"], default="monai",
                   help="monai: max of the two directed 95th percentiles (default); "
                        "pooled: 95th percentile of both directions together (medpy)")
    e.add_argument("--topology", action="store_true", help="also report Betti-number errors per structure")
    e.add_argument("--dataset", type=Path, default=None, help="dataset folder whose dataset.json names the labels")
    e.add_argument("--run", type=Path, default=None, help="run folder whose spec.json names the labels")
    e.set_defaults(func=_cmd_evaluate)

    ds = sub.add_parser(
        "dataset", help="assemble a dataset folder from your own files (links, no copies)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build a dataset folder (dataset.json + links to your files) from any file naming: one glob "
                    "per channel and one for the labels; a case's id is the part of the names its files share. "
                    "Every case's channels and label are checked to share one grid (all failing cases are "
                    "named) and the label values to be the declared ones, before anything is written.",
        epilog="example (MyoPS 2020: bSSFP, LGE and T2 with labels 200/500/600/1220/2221):\n"
               "  crossmodalnet dataset data/myops --channel C0='raw/*_C0.nii.gz' --channel LGE='raw/*_LGE.nii.gz' \\\n"
               "      --channel T2='raw/*_T2.nii.gz' --label 'raw/*_gd.nii.gz' \\\n"
               "      --labels MYO=200 LV=500 RV=600 edema=1220 scar=2221 \\\n"
               "      --region LV=500 --region RV=600 --region myocardium=200,1220,2221 \\\n"
               "      --region edema+scar=1220,2221 --region scar=2221\n"
               "  crossmodalnet train data/myops --out runs/myops")
    ds.add_argument("out", type=Path, help="new dataset folder")
    ds.add_argument("--channel", type=_name_value, action="append", required=True, metavar="NAME=GLOB",
                    help="a channel: its name (CT, MR, C0, LGE, T2, FLAIR, ...: CT gets CT normalisation) and a "
                         "glob of its files; 1 to 4, in channel order")
    ds.add_argument("--label", default=None, metavar="GLOB", help="glob of the label maps (cases without one: test)")
    ds.add_argument("--labels", type=_name_value, nargs="+", required=True, metavar="NAME=VALUE",
                    help="the label names and their values in the label files (background 0 is implied)")
    ds.add_argument("--region", type=_name_value, action="append", default=None, metavar="NAME=V1,V2",
                    help="a region: a union of label values (or names), evaluated as its own row")
    ds.add_argument("--train-regions", action="store_true",
                    help="train one sigmoid per region (nnU-Net's region training) instead of softmax over labels")
    ds.add_argument("--test-fraction", type=float, default=0.0, metavar="F",
                    help="share of the labelled cases held out as a labelled test split, drawn by --seed (default 0)")
    ds.add_argument("--seed", type=int, default=0, help="seed of the test draw (default 0)")
    ds.add_argument("--copy", action="store_true", help="copy the files instead of linking them")
    ds.add_argument("--unregistered", action="store_true",
                    help="the channels may be a few voxels apart (CT and MR of separate scans); by default they are "
                         "registered voxel to voxel (sequences of one session), and CrossModalNet then takes every "
                         "channel's fine detail and no deformable offsets")
    ds.add_argument("--name", default=None, help="dataset name (default: the folder's name)")
    ds.set_defaults(func=_cmd_dataset)

    pl = sub.add_parser(
        "plan", help="the dataset's plan: spacing, patch, per-axis strides and windows, batch, and why",
        description="Fingerprint the labelled training cases of DATA (spacings, shapes, foreground intensities, "
                    "class volumes) and derive the training plan for a model and device, nnU-Net style: the "
                    "configuration (2d where a slice axis is over 3x the finest spacing, as MyoPS and ACDC: slices "
                    "kept as stored, one-slice patches, at least 8 per step; else 3d), target spacing, the in-plane "
                    "spacing coarsened until half the field of view fits the device, the patch, per-axis strides "
                    "(an axis is halved only while at most twice the finest), windows, kernels and batch. `train` "
                    "makes the same plan itself for whatever its configuration leaves open; this command shows it "
                    "first.")
    pl.add_argument("data", type=Path, help="dataset folder with dataset.json")
    pl.add_argument("--model", default="crossmodalnet", help="registered model name (default crossmodalnet)")
    pl.add_argument("--size", default="small", help="tiny | small | base (default small)")
    pl.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="whose budget the plan fits (default cpu)")
    pl.add_argument("--configuration", choices=["auto", "2d", "3d"], default="auto",
                    help="2d: one-slice patches (nnU-Net's 2d); 3d; auto (default): 2d where the data have a slice "
                         "axis over 3x the finest spacing, else 3d")
    pl.add_argument("--out", type=Path, default=None,
                    help="file for the plan and fingerprint (default DATA/plans.json)")
    pl.set_defaults(func=_cmd_plan)

    m = sub.add_parser("models", help="list registered models with parameters and GFLOPs",
                       description="Every registered model with its parameters and forward GFLOPs on an "
                                   "input of --channels channels of S³ voxels (PyTorch's FlopCounterMode).")
    m.add_argument("--size", type=int, default=96, metavar="S", help="input edge length S (default 96)")
    m.add_argument("--channels", type=int, default=2, choices=[1, 2, 3, 4],
                   help="input channels (CrossModalNet streams) the models are counted with (default 2: CT + MR)")
    m.add_argument("--model-size", default="small", choices=["tiny", "small", "base"],
                   help="named model size (default small, the CPU default)")
    m.set_defaults(func=_cmd_models)

    t = sub.add_parser("train", help="train a model on a dataset folder",
                       description="Train CrossModalNet (or a baseline) on a dataset folder. The run "
                                   "folder holds config.yaml, model.safetensors (best by validation "
                                   "Dice), last/ (resume state), metrics.csv and curves.png.")
    t.add_argument("data", type=Path, help="dataset folder with dataset.json")
    t.add_argument("--out", type=Path, required=True, help="run folder")
    t.add_argument("--model", default=None, help="registered model name (default crossmodalnet)")
    t.add_argument("--size", default=None, help="tiny | small | base (default small)")
    t.add_argument("--config", type=Path, default=None, help="YAML TrainConfig (e.g. configs/paper.yaml)")
    t.add_argument("--epochs", type=int, default=None, help="number of epochs")
    t.add_argument("--max-minutes", type=float, default=None, help="stop after this wall time, saving")
    t.add_argument("--seed", type=int, default=None, help="random seed")
    t.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from last/")
    t.set_defaults(func=_cmd_train)

    ad = sub.add_parser(
        "adapt", help="adapt a trained CrossModalNet to an unlabeled new domain (JADA)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=ADAPT_DESCRIPTION, epilog=ADAPT_EPILOG)
    ad.add_argument("run", type=Path,
                    help="source-trained run folder (config.yaml, model.safetensors, preprocess.json)")
    ad.add_argument("--source", type=Path, required=True,
                    help="labeled source dataset folder (the run's training data)")
    ad.add_argument("--target", type=Path, required=True,
                    help="target dataset folder; only the images of its training and validation cases are read")
    ad.add_argument("--out", type=Path, required=True, help="new run folder for the adapted model")
    ad.add_argument("--terms", default=None,
                    help="comma-separated subset of marginal,conditional,topology (default: all three), or none")
    ad.add_argument("--epochs", type=int, default=None, help="epochs of adaptation (default 10 x 20 steps)")
    ad.add_argument("--max-minutes", type=float, default=None, help="stop after this wall time, saving")
    ad.add_argument("--lr", type=float, default=None, help="segmenter learning rate, annealed (default 5e-4)")
    ad.add_argument("--config", type=Path, default=None,
                    help="YAML of AdaptConfig settings (crossmodalnet.train.adapt.AdaptConfig)")
    ad.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    ad.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N")
    ad.add_argument("--resume", action="store_true", help="continue the adaptation in --out from last/")
    ad.set_defaults(func=_cmd_adapt)

    r = sub.add_parser("predict", help="segment whole volumes into NIfTI label maps",
                       description="Predict with a trained run. INPUT is a dataset folder (its test "
                                   "split) or give one case's files with --image NAME=FILE (channel names of "
                                   "the run). Label maps keep the input geometry and hold the dataset's label "
                                   "values; for a prepare-mmwhs folder they are also written on the original "
                                   "fixed-image grid in OUT/original/<id>.nii.gz.")
    r.add_argument("run", type=Path, help="run folder (config.yaml + model.safetensors)")
    r.add_argument("input", type=Path, nargs="?", default=None, help="dataset folder (test split)")
    r.add_argument("--image", type=_name_value, action="append", default=None, metavar="NAME=FILE",
                   help="one channel of one case, by the run's channel name (e.g. --image C0=a.nii.gz "
                        "--image LGE=b.nii.gz); all on one grid")
    r.add_argument("--ct", type=Path, default=None, help="shorthand for --image CT=FILE")
    r.add_argument("--mr", type=Path, default=None, help="shorthand for --image MR=FILE")
    r.add_argument("--out", type=Path, required=True, help="output folder or .nii.gz file")
    r.add_argument("--split", default="test", help="dataset split to predict (default test)")
    r.add_argument("--labels", choices=["values", "codes", "indices"], default="values",
                   help="write the dataset's label values (default; 'codes' is the old name) or class indices")
    r.add_argument("--probabilities", action="store_true", help="also write per-class probabilities (4D)")
    r.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N")
    r.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="inference precision: auto (default) = fp16 autocast on CUDA, fp32 on the CPU; bf16 is "
                        "faster on CPUs with AVX-512 BF16/AMX at a measured Dice change (docs/benchmarks.md)")
    r.add_argument("--checkpoint", choices=["best", "last"], default="best",
                   help="weights: best (default; model.safetensors, the best validation Dice) or last (RUN/last/, "
                        "the final step of a finished run, as nnU-Net's -chk checkpoint_final.pth): use last when "
                        "the cases you score are the validation cases that chose best")
    r.add_argument("--postprocess", choices=["auto", "none", "largest-component"], default="auto",
                   help="label-map postprocessing: auto (default) = what training chose on its validation cases "
                        "(RUN/postprocess.json, as nnU-Net: keep only the largest foreground component where that "
                        "raised the validation Dice), largest-component, or none (the network's output)")
    r.set_defaults(func=_cmd_predict)

    d = sub.add_parser("demo", help="synthesize, train, predict and evaluate on phantoms, in minutes")
    d.add_argument("--out", type=Path, default=Path("runs/demo"), help="demo folder (default runs/demo)")
    d.add_argument("--minutes", type=float, default=None, help="training time budget in minutes")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.set_defaults(func=_cmd_demo)

    c = sub.add_parser("cmif", help="cross-modal information flow I(F_ct; F_mr) per layer (Def. 7)",
                       description="Mutual information between the CT and MR streams (positions as samples, "
                                   "PCA-reduced features) at the input, the stem, after every Swin stage and every "
                                   "Cross Transformer block, and CMIF(l) = I(l) - I(l-1), averaged over cases; for "
                                   "the trained run, an untrained model of the same configuration and the ablation "
                                   "without Cross Transformer blocks. Writes cmif.csv, cmif.json, cmif.png.")
    _add_analysis_args(c, cases=3, estimator="both")
    c.add_argument("--max-samples", type=int, default=4096,
                   help="positions subsampled per layer for the KSG estimator (default 4096)")
    c.add_argument("--ablation-run", type=Path, default=None,
                   help="a trained run with cross_blocks: false (default: the ablation untrained)")
    c.set_defaults(func=_cmd_cmif)

    au = sub.add_parser("audit", help="check each theorem of the paper on a trained model, with numbers",
                        description="Empirical audit of the paper's claims (Theorems 2.1-2.7, Lemma 1, Corollaries "
                                    "1-2) on a trained run: one row per claim with how it was tested, the numbers "
                                    "and a verdict computed from them. Writes audit.md and audit.json.")
    _add_analysis_args(au, cases=2, estimator="gaussian")
    au.add_argument("--balancing-steps", type=int, default=40,
                    help="steps of the side experiment on loss balancing when the run did not balance (default 40; "
                         "0 skips it)")
    au.add_argument("--lipschitz-edge", type=int, default=32,
                    help="edge of the centred crop the Lipschitz probes run on, in voxels (default 32)")
    au.add_argument("--power-iterations", type=int, default=5,
                    help="power iterations for the gradient-direction Lipschitz constant (default 5)")
    au.set_defaults(func=_cmd_audit)
    for command in sub.choices.values():  # `crossmodalnet COMMAND ... --debug` works too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="print the traceback of an error as well as its one-line message")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ValidationError as exc:  # a configuration built from flags: the schema's one line
        _report(f"{exc.title}: {describe_validation_error(exc)}", args.debug)
        return 2
    except EXPECTED as exc:
        _report(describe(exc), args.debug)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def _report(line: str | None, debug: bool) -> None:
    """The traceback only when asked for (it is for developers); the line always, last."""
    if debug:
        traceback.print_exc()
    print(f"error: {line}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
