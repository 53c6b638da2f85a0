"""One error type for everything a user can fix: the CLI prints its message and exits with 2."""


class TaokeError(Exception):
    """A problem in the user's input (recipe, data, model reference) with a message saying what to do."""


class RecipeError(TaokeError):
    pass


class DataError(TaokeError):
    pass


class ModelError(TaokeError):
    pass


class FormatError(ModelError, DataError):
    """Bytes that are not what their format says: the message names the file and what is wrong.

    Both a ModelError and a DataError, so code that handles a bad model file or a bad data file handles a
    malformed one too."""
