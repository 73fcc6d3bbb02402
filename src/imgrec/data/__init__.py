from imgrec.data.loader import BatchLoader, DataBundle, ImageData, load_data

__all__ = ["BatchLoader", "DataBundle", "ImageData", "load_data"]
