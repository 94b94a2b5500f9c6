from lit_imgcls.data.datamodule import ImageDataModule
from lit_imgcls.data.tensors import ImageTensors, TensorImageDataset

__all__ = ["ImageDataModule", "ImageTensors", "TensorImageDataset"]
