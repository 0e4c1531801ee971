"""authsession: passwordless e-mail login and device sessions."""

__version__ = "0.1.0"
