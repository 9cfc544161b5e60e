"""The command line's long help texts (the flow, the adaptation recipe): prose kept apart from the
parser so that `cli.py` stays a list of commands and their options."""

__all__ = ["EPILOG", "ADAPT_DESCRIPTION", "ADAPT_EPILOG"]

EPILOG = """\
The flow:
  crossmodalnet dataset data/myops --channel C0='raw/*_C0.nii.gz' --channel LGE='raw/*_LGE.nii.gz' \\
      --channel T2='raw/*_T2.nii.gz' --label 'raw/*_gd.nii.gz' --labels MYO=200 LV=500 RV=600 \\
      edema=1220 scar=2221 --region scar=2221 --region edema+scar=1220,2221   # your own files
  crossmodalnet synth data/phantoms --cases 20 --size 96      # or paired CT/MR phantoms, no download
  crossmodalnet train data/phantoms --out runs/cmn             # CPU default model
  crossmodalnet predict runs/cmn data/phantoms --out runs/cmn/pred
  crossmodalnet evaluate runs/cmn/pred data/phantoms/labelsTs --out runs/cmn/eval
  crossmodalnet adapt runs/cmn --source data/phantoms --target data/target --out runs/cmn-jada   # JADA
  crossmodalnet demo                                           # all of the above, small, in minutes
"""

ADAPT_DESCRIPTION = """\
Joint adversarial domain adaptation (JADA): continue a source-trained CrossModalNet run on
labeled SOURCE cases and unlabeled TARGET cases. Only the target images of its training and
validation cases are read; target label files are never opened, the target test split is not used.

Each step runs B source and B target patches through the model once and minimises these terms,
weighted by the adaptive loss balancing of Def. 4 (weights logged):
  Dice + CE    on the source patches, so that the segmentation is not forgotten; half of the
               source images get a random intensity transfer function first (source_remap),
               so that structures are recognised by shape rather than by contrast;
  marginal     a domain discriminator on every token of the fused encoder features at
               stride 8 (feature_stage -2, token_level) behind a gradient reversal layer
               (DANN; lambda ramps 0 -> 1): the encoder learns features from which source
               and target cannot be told apart;
  conditional  a discriminator on features x predicted class probabilities per token (CDAN
               multilinear map, randomised when large; entropy weighting): aligns the domains
               class by class, not only overall;
  topology     a persistent-homology penalty on the target predictions (gudhi, at 24^3:
               components from the max-pooled softmax, holes from the min-pooled one): each
               structure one connected component, no tunnels, no cavities (the myocardium
               together with the LV it wraps); only the bars that change the thresholded
               segmentation count, a stray fragment is removed and a hole is filled (never
               bridged or broken).
--terms none runs the recipe without any term (the ablation: source fine-tuning only).

OUT is a run folder like train's: config.yaml and preprocess.json of the source run,
model.safetensors = the FINAL weights (no target labels to select with; the best source-
validation Dice is kept aside in model_best_source.safetensors), last/ for --resume, steps.csv
(discriminator losses and accuracies, loss weights, lambda), metrics.csv and curves.png.
`crossmodalnet predict OUT ...` works on it unchanged.
"""

ADAPT_EPILOG = """\
example:
  crossmodalnet synth data/target --domain target --cases 20 --size 64
  crossmodalnet adapt runs/cmn --source data/phantoms --target data/target --out runs/cmn-jada \\
      --epochs 10 --terms marginal,conditional,topology
  crossmodalnet predict runs/cmn-jada data/target --out runs/cmn-jada/pred
  crossmodalnet evaluate runs/cmn-jada/pred data/target/labelsTs --out runs/cmn-jada/eval --topology
"""
