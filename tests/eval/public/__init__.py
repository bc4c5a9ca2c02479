"""Detection quality on public labelled data (``make eval-public``); see ``harness``."""
