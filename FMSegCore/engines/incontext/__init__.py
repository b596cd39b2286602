"""In-context segmentation: a support set of labelled examples defines the task; no training.

The modules are imported where used (``session``, ``support``, ``anatomical``, ``volume3d``, ``task_file``,
``corrections``), so that importing one of them (e.g. the task file's suffix, for the CLI's parser) does not
import torch and MONAI.
"""
