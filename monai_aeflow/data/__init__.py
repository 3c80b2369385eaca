"""Data: loading, preprocessing, indexers, data-file checks, subject-level splits, slice sampling, synthetic brains."""

from monai_aeflow.data.bundle_datalists import prepare_brain_mri_datalist, prepare_image_datalist
from monai_aeflow.data.checks import check_data_files
from monai_aeflow.data.indexers import (
    INDEXERS,
    index_atlas,
    index_brats,
    index_dataset,
    index_folder,
    index_image_folder_2d,
    index_ixi,
)
from monai_aeflow.data.io import LoadImageCheckedd, load_image, reraise_input_errors
from monai_aeflow.data.isic import index_isic
from monai_aeflow.data.preprocessing import PreprocessingCompose, build_image_preprocessing, build_volume_preprocessing
from monai_aeflow.data.slices import (
    DEFAULT_MIN_AREA_FRACTION,
    SliceDataset,
    extract_slice,
    make_slice_dataset,
    select_slices,
)
from monai_aeflow.data.smoothing import CurvatureFlowd
from monai_aeflow.data.splits import check_disjoint_subjects, read_split_csv, split_by_subject, write_split_csv
from monai_aeflow.data.synthetic import (
    SyntheticSubject,
    extract_slices,
    generate_cohort,
    generate_synthetic_images,
    make_slices,
    make_subject,
)
from monai_aeflow.data.transforms import (
    BinarizeLabeld,
    BrainMaskd,
    CastMasksd,
    CropOrPadInPlaned,
    ResampleToSpacingd,
    ResizeImaged,
    ScaleIntensityInMaskd,
    percentile_scale,
)

__all__ = [
    "DEFAULT_MIN_AREA_FRACTION",
    "INDEXERS",
    "BinarizeLabeld",
    "BrainMaskd",
    "CastMasksd",
    "CropOrPadInPlaned",
    "CurvatureFlowd",
    "LoadImageCheckedd",
    "PreprocessingCompose",
    "ResampleToSpacingd",
    "ResizeImaged",
    "ScaleIntensityInMaskd",
    "SliceDataset",
    "SyntheticSubject",
    "build_image_preprocessing",
    "build_volume_preprocessing",
    "check_data_files",
    "check_disjoint_subjects",
    "extract_slice",
    "extract_slices",
    "generate_cohort",
    "generate_synthetic_images",
    "index_atlas",
    "index_brats",
    "index_dataset",
    "index_folder",
    "index_image_folder_2d",
    "index_isic",
    "index_ixi",
    "load_image",
    "make_slice_dataset",
    "make_slices",
    "make_subject",
    "percentile_scale",
    "prepare_brain_mri_datalist",
    "prepare_image_datalist",
    "read_split_csv",
    "reraise_input_errors",
    "select_slices",
    "split_by_subject",
    "write_split_csv",
]
