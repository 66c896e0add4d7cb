"""spotrunner: train on preemptible VMs and finish as if nothing had happened."""

__version__ = "0.1.0"
