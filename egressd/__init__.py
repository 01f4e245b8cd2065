"""egressd: shows where data leaves the country, and whether an approved export route covers it."""

__version__ = "0.1.0"
