"""csand: keeps Action Network current with ControlShift petition creators and signers."""

__version__ = "0.1.0"
