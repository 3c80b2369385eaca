"""MONAI Label app folder of monai-aeflow: AE-FLOW lesion mask, anomaly map and scores for every study.

Start::

    monailabel start_server --app apps/aeflow_label --studies /data/nifti --conf model runs/brats/model.pt \\
        --host 127.0.0.1

Options (``--conf KEY VALUE``): ``model`` (required: a trained ``.pt`` file or a bundle folder), ``device``
(``auto``), ``batch_size`` (32), ``threshold`` (the model's), ``label`` (``anomaly``), ``name`` (``aeflow``:
``POST /infer/aeflow?image=<id>``), ``save_anomaly_map`` (``true``: the float map of each image is stored in the
datastore under the label tag ``anomaly_map``), ``levels`` (``true``: also the heat-map model ``aeflow_levels``),
``dicom_store`` (``true``: on a DICOMweb datastore, DICOM SEG and Parametric Map of each series go back to the
server). See ``apps/aeflow_label/README.md``.

MONAI Label serves the first class of this module that derives directly from ``MONAILabelApp``; the app lives in
the installed package (:class:`monai_aeflow.label.AEFlowLabelApp`) so that it is tested and versioned with it.
"""

from monai_aeflow.label.app import AEFlowLabelApp

__all__ = ["AEFlowLabelApp"]
