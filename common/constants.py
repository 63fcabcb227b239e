"""Named constants shared by every part of fedinterest."""

# Item index 0 never names an item: it pads short histories on the left. Real items are
# numbered 1..num_items in the order of the dataset's catalogue.
PAD_ID = 0

# Leave-one-out needs one training item, one validation target and one test target.
MIN_INTERACTIONS_FOR_SPLIT = 3
