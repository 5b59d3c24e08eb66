"""OpenAI's Files and Batches for ``/v1/embeddings``: a batch input file is run as a backfill.

- ``requests``: a line of the input file read as a request (pure), and the reader that hands
  the accepted requests' texts to the backfill, one item per text named ``LLLLLLLL.I``;
- ``uploads``: uploaded bytes in the files folder, streamed to disk under a cap;
- ``runner``: one batch's phases (validating, in_progress, finalizing or cancelling) on the
  store, with the backfill's backpressure, content cache and resume;
- ``background``: who runs a batch (a thread of a ``serve`` process holding the batch's lease);
- ``output``: the output and error files, written from the store as they are downloaded;
- ``shapes``: OpenAI's File and Batch objects and their ids.
"""
