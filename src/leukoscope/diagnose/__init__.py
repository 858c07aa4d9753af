"""Patient-level diagnosis from many cells: AML vs APL from a patient's set of single-cell images, the differential
count of cell types, and the cells that weighed most.

    from leukoscope.diagnose import diagnose
    results = diagnose(["Patient_07/"])          # shipped models `apl` + `cell-type`
    r = results[0]; r.label, r.p_apl, r.n_cells, r.differential()

The patient model and its cross-validation are described in docs/DIAGNOSE.md.
"""

from leukoscope.diagnose.core import (
    CSV_COLUMNS,
    Diagnoser,
    PatientInput,
    PatientResult,
    diagnose,
    patients_from,
    write_csv,
)
from leukoscope.diagnose.mil import GatedAttentionMIL, MILConfig, fit_mil, predict_mil
from leukoscope.diagnose.model import BagScore, PatientModel, load_patient_model

__all__ = ["CSV_COLUMNS", "BagScore", "Diagnoser", "GatedAttentionMIL", "MILConfig", "PatientInput", "PatientModel",
           "PatientResult", "diagnose", "fit_mil", "load_patient_model", "patients_from", "predict_mil", "write_csv"]
