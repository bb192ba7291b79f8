"""Models from the Hugging Face hub, fetched in part: only the bytes of the tensors a server's span
(or a client's local layers) needs, with HTTP range requests, into a resumable, bounded cache."""
