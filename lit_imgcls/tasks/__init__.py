from lit_imgcls.tasks.classifier import ImageClassifier
from lit_imgcls.tasks.knn import KNNClassifier, KNNMonitor

__all__ = ["ImageClassifier", "KNNClassifier", "KNNMonitor"]
