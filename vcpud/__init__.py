"""vcpud: host-side CPU placement for QEMU/KVM guests."""

__version__ = "0.1.0"
