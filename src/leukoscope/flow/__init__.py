"""Flow cytometry: FCS reading, compensation, transforms, per-subject features, a calibrated SVM, and fusion with
image evidence. FlowIO / FlowUtils (the ``flow`` extra) are imported only by the functions that read files or
compute the logicle transform.

Typical use::

    from leukoscope.flow import load_flow_model, predict_files
    rows, errors = predict_files(load_flow_model(), ["0004.FCS"])
"""

from leukoscope.flow.classifier import ClassifierSpec, FittedClassifier, fit_classifier, fit_platt, subject_folds
from leukoscope.flow.compensation import Spillover, compensate, spillover_from_dfc, spillover_from_keywords
from leukoscope.flow.config import CVSpec, DataSpec, FlowConfig, load_flow_config
from leukoscope.flow.data import (
    CLASSES,
    FeatureTable,
    FlowCase,
    flow_data_root,
    flowcap_fcs_cases,
    load_feature_table,
    read_manifest,
)
from leukoscope.flow.fcs import FCSReadError, FlowSample, match_channels, read_fcs
from leukoscope.flow.features import FeatureSpec, Featurizer, case_events
from leukoscope.flow.fusion import FusionWeights, fit_stacking, fuse, load_fusion, logit, save_fusion
from leukoscope.flow.model import (
    FlowModel,
    cross_validate,
    cv_metrics,
    default_flow_model_dir,
    load_flow_model,
    predict_files,
    save_flow_model,
    train_flow_model,
)
from leukoscope.flow.transforms import arcsinh, arcsinh_inverse, logicle, logicle_inverse

__all__ = [
    "CLASSES", "CVSpec", "ClassifierSpec", "DataSpec", "FCSReadError", "FeatureSpec", "FeatureTable", "Featurizer",
    "FittedClassifier", "FlowCase", "FlowConfig", "FlowModel", "FlowSample", "FusionWeights", "Spillover", "arcsinh",
    "arcsinh_inverse", "case_events", "compensate", "cross_validate", "cv_metrics", "default_flow_model_dir",
    "fit_classifier", "fit_platt", "fit_stacking", "flow_data_root", "flowcap_fcs_cases", "fuse", "load_feature_table",
    "load_flow_config", "load_flow_model", "load_fusion", "logicle", "logicle_inverse", "logit", "match_channels",
    "predict_files", "read_fcs", "read_manifest", "save_flow_model", "save_fusion", "spillover_from_dfc",
    "spillover_from_keywords", "subject_folds", "train_flow_model",
]
