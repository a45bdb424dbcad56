import os
import sys

# Let ``import calc`` work whatever the working directory.
sys.path.insert(0, os.path.dirname(__file__))
