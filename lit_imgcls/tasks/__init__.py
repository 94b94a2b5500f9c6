from lit_imgcls.tasks.classifier import ImageClassifier

__all__ = ["ImageClassifier"]
