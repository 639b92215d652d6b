"""transferkit: transfer learning for Keras 3 from the command line.

Importing the package is cheap: TensorFlow is imported only by the modules that need it.
"""

__version__ = "0.1.0"
