"""The iNaturalist collector: from the public `inaturalist-open-data` bucket to a training channel.

It streams the bucket's metadata, picks photos by species, box, quality grade and licence,
caps each class with a seeded choice, copies the photos to an S3 prefix or down to a local
folder, and writes the CSV `train` reads, with each photo's licence and who to credit.

One module per stage: `settings` (flags, TOML, validation), `metadata` (the streamed,
resumable `.csv.gz` files), `selection` (which photos, and why the others were left out),
`scan_progress` (what the finished passes of an interrupted scan found),
`destination` (the source bucket, an S3 prefix or a local folder), `copying` (many photos at
once, and what a photo gone from the bucket means), `cli` (the run, its plan, CSV and summary).
"""


class CollectError(Exception):
    """The collection cannot go on; the message says what was wrong and what to do."""
