"""The MLflow model of a registered fgvc version (MLflow's models-from-code).

MLflow runs this file to load the model; nothing is unpickled. `load_context` rebuilds the
network from the checkpoint artifact (state_dict + spec, read with ``weights_only=True``);
`predict` takes uint8 images ``[N, H, W, 3]`` of any size and returns, per image, the
designer, its class index and probability, and the top-k designers with their probabilities
(``params={"top_k": k}``, default 5).
"""

import numpy as np
import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


class DesignerClassifier(PythonModel):
    def load_context(self, context):
        from fgvc.models.predict import Predictor

        self.predictor = Predictor.from_checkpoint(context.artifacts["checkpoint"])

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> pd.DataFrame:
        top_k = int((params or {}).get("top_k", 5))
        return pd.DataFrame(self.predictor.predict(model_input, top_k=top_k))


set_model(DesignerClassifier())
