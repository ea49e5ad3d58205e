"""Data: webdataset shards (img2dataset layout), transforms, caption cleaning, tokenised collate."""

from blip2_train.data.text import QFormerTextCollate, clean_caption
from blip2_train.data.transforms import eval_transform, train_transform
from blip2_train.data.webdataset import Blip2DataModule, DataLayoutError, expand_urls, skipped_fraction

__all__ = ["Blip2DataModule", "DataLayoutError", "QFormerTextCollate", "clean_caption", "eval_transform",
           "expand_urls", "skipped_fraction", "train_transform"]
