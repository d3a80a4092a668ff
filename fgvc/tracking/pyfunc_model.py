"""The MLflow model of a registered fgvc version (MLflow's models-from-code).

MLflow runs this file to load the model; nothing is unpickled. `load_context` rebuilds the
network from the checkpoint artifact (state_dict + spec, read with ``weights_only=True``);
`predict` takes images of any size and returns, per image, the designer, its class index and
probability, and the top-k designers with their probabilities (``params={"top_k": k}``,
default 5, an integer >= 1). Images come as uint8 ``[N, H, W, 3]`` (integers 0..255; floats,
booleans and out-of-range numbers are refused, never cast) or as JPEG/PNG bytes in base64
text, in a column ``image`` (``{"dataframe_split": {"columns": ["image"], "data": [["<base64>"]]}}``
or ``{"inputs": {"image": ["<base64>"]}}``). A refused input is an MLflow INVALID_PARAMETER_VALUE
error: `mlflow models serve` answers it with HTTP 400 and the reason, and keeps serving. The
pixel and byte budgets are fgvc.models.predict's (FGVC_MAX_PIXELS, FGVC_MAX_IMAGE_BYTES).
"""

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


class DesignerClassifier(PythonModel):
    def load_context(self, context):
        from fgvc.models.predict import Predictor

        self.predictor = Predictor.from_checkpoint(context.artifacts["checkpoint"])

    # The np.ndarray hint (MLflow's no-validation kind) keeps MLflow from converting or
    # validating the input: images and base64 tables are checked by images_from_input.
    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> pd.DataFrame:
        from fgvc.errors import FgvcError
        from fgvc.models.predict import check_top_k

        try:
            top_k = check_top_k((params or {}).get("top_k", 5))
            return pd.DataFrame(self.predictor.predict(model_input, top_k=top_k))
        except FgvcError as e:
            raise MlflowException.invalid_parameter_value(str(e).splitlines()[0]) from None


set_model(DesignerClassifier())
