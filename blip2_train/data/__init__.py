"""Data: webdataset shards (img2dataset layout), transforms, caption cleaning, tokenised collate."""

from blip2_train.data.webdataset import Blip2DataModule, expand_urls

__all__ = ["Blip2DataModule", "expand_urls"]
