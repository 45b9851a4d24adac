"""policyd: a Postfix policy daemon that checks the SASL login owns the envelope sender."""

__version__ = "0.1.0"
