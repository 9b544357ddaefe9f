"""sr3d: 3D super-resolution of CT and MRI scans with a two-stage CNN.

`import sr3d` stays light: TensorFlow is imported only when a network is used.
"""
__version__ = "0.1.0"
