from lit_imgcls.tasks.base import ClassificationTask
from lit_imgcls.tasks.classifier import ImageClassifier
from lit_imgcls.tasks.distill import DistillationModule, export_student
from lit_imgcls.tasks.fixmatch import FixMatch
from lit_imgcls.tasks.knn import KNNClassifier
from lit_imgcls.tasks.knn_monitor import KNNMonitor
from lit_imgcls.tasks.noisy_student import NoisyStudent

__all__ = [
    "ClassificationTask",
    "DistillationModule",
    "FixMatch",
    "ImageClassifier",
    "KNNClassifier",
    "KNNMonitor",
    "NoisyStudent",
    "export_student",
]
