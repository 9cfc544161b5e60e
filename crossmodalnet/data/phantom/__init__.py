"""Synthetic paired CT/MR whole-heart phantoms: the embedded default data set and the test fixture.

Each case draws its own anatomy (`anatomy`: implicit shapes of the heart and thorax in priority
order, pose, size and a smooth elastic deformation), which is rasterised (`raster`) on any grid,
so CT and MR grids of one case show the same patient: CT on a size^3 grid of 144 mm, MR on its own
coarser grid, through a rigid + elastic misalignment (`warp`), then rendered into intensities per
imaging domain (`render`). `generate` makes one case in memory, `synthesize` writes a data set,
`preview` draws a PNG montage.

Outputs (`synthesize`): layout "dataset" writes imagesTr/, labelsTr/, imagesTs/, labelsTs/
(`case_000_ct.nii.gz`, `case_000_mr.nii.gz`, `case_000.nii.gz`), `dataset.json` and the sidecar
`phantom.json`; layout "mmwhs" writes the raw MM-WHS naming and `mmwhs_truth.json`.

Shapes: label maps (X, Y, Z) uint8 class indices; images (X, Y, Z) float32 in memory, int16 on disk
(HU for CT, as scanners write them); world coordinates are RAS mm.
"""

from crossmodalnet.data.phantom.anatomy import Anatomy, sample_anatomy
from crossmodalnet.data.phantom.generate import FOV_MM, PhantomCase, generate_case, split_cases
from crossmodalnet.data.phantom.preview import write_preview
from crossmodalnet.data.phantom.raster import rasterize
from crossmodalnet.data.phantom.synthesize import synthesize
from crossmodalnet.data.phantom.warp import RigidElastic

__all__ = [
    "FOV_MM",
    "Anatomy",
    "RigidElastic",
    "PhantomCase",
    "sample_anatomy",
    "rasterize",
    "generate_case",
    "split_cases",
    "write_preview",
    "synthesize",
]
