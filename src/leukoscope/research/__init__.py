"""Research tools: they measure and compare; the product does not need them to predict, explain or serve.

- :mod:`~leukoscope.research.compare`: every model family on one group split, one table (``leukoscope compare``);
- :mod:`~leukoscope.research.classical`: handcrafted cell features with a Random Forest or an RBF SVM (the classical
  baselines), and :mod:`~leukoscope.research.embed_svm`: the SVM on frozen CNN embeddings;
- :mod:`~leukoscope.research.faithfulness`: deletion / insertion and ROAD of heatmap methods against a random map
  (``leukoscope faithfulness``; the verdicts it records are read by :mod:`leukoscope.explain.record`);
- :mod:`~leukoscope.research.patient_study`: patient-grouped cross-validation of the ways from cells to a patient-level
  AML / APL call (``benchmarks/deepapl_targets.py``).

They call the product core's public functions; the core never imports them (``tests/test_layers.py``). The one
exception is reached lazily: ``load_model`` on a directory that a classical model saved loads it through
:mod:`~leukoscope.research.classical`.
"""
