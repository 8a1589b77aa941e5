"""Documents (Beanie on MongoDB) and the object store (minio client on S3)."""
