"""A tiny CoLA model that trains on a 2-core CPU in minutes (the README's demo)."""

from colax import config


def get_config():
    return config.preset("cola", "tiny")
