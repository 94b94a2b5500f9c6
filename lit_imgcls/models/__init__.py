from lit_imgcls.models.factory import available_models, create_model
from lit_imgcls.models.lenet import LeNet5

__all__ = ["LeNet5", "available_models", "create_model"]
