"""Scale: the registered pyfunc as a Spark UDF over a DataFrame of image bytes, on a local Spark session."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess

import pandas as pd
import pytest



def java_missing() -> str:
    """Why Spark cannot start here, or '' when it can (pyspark 4 needs Java 17 or newer)."""
    if importlib.util.find_spec("pyspark") is None:
        return "pyspark is not installed (pip install pyspark)"
    if shutil.which("java") is None:
        return "no java on PATH (Spark needs a JDK 17+)"
    try:
        proc = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"java -version failed: {exc}"
    return "" if proc.returncode == 0 else f"java -version failed: {proc.stderr.strip()[:200]}"


pytestmark = [
    pytest.mark.skipif(bool(java_missing()), reason=java_missing() or "spark available"),
    pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas:FutureWarning"),
]


@pytest.fixture(scope="module")
def spark():
    from pyspark.sql import SparkSession

    session = (SparkSession.builder.master("local[1]").appName("camid-tests")
               .config("spark.ui.enabled", "false").config("spark.driver.bindAddress", "127.0.0.1")
               .config("spark.driver.host", "127.0.0.1").config("spark.sql.shuffle.partitions", "1")
               .getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def test_spark_udf_matches_the_pyfunc(spark, registered_model):
    import mlflow
    from pyspark.sql import functions as F
    from pyspark.sql.types import BooleanType, DoubleType, StringType, StructField, StructType

    model = registered_model
    photos = model.test.head(4)
    flags = [True, None, False, None]  # None: the model estimates the flag
    rows = [(p.split("/")[-1], open(p, "rb").read(), flag) for p, flag in zip(photos.path, flags)]
    frame = spark.createDataFrame(rows, "fname string, image binary, manipulated boolean")

    # A struct result type picks the model's output columns by name: the camera, the flag, the probabilities.
    result = StructType([StructField("camera", StringType()), StructField("manipulated", BooleanType())]
                        + [StructField(label, DoubleType()) for label in model.labels])
    udf = mlflow.pyfunc.spark_udf(spark, model.local_uri, result_type=result, env_manager="local")
    # Columns go in as one struct so that they reach the model by name (the optional `manipulated` may be left out).
    scored = frame.select("fname", udf(F.struct("image", "manipulated")).alias("p")).select("fname", "p.*").toPandas()

    expected = mlflow.pyfunc.load_model(model.local_uri).predict(
        pd.DataFrame({"image": [r[1] for r in rows], "manipulated": flags}))
    assert list(scored.fname) == [r[0] for r in rows]
    assert list(scored.camera) == list(expected.camera)
    assert list(scored.manipulated) == list(expected.manipulated)
    assert scored[model.labels].to_numpy() == pytest.approx(expected[model.labels].to_numpy(), abs=1e-9)


def test_a_bad_row_in_a_spark_job_gets_its_error_value_not_a_failed_job(spark, registered_model):
    import mlflow
    from pyspark.sql import functions as F
    from pyspark.sql.types import DoubleType, StringType, StructField, StructType

    model = registered_model
    good = [open(p, "rb").read() for p in model.test.path[:2]]
    rows = [("a.jpg", good[0]), ("junk.jpg", b"not an image"), ("b.jpg", good[1])]
    frame = spark.createDataFrame(rows, "fname string, image binary")
    result = StructType([StructField("camera", StringType()), StructField("error", StringType())]
                        + [StructField(label, DoubleType()) for label in model.labels])
    udf = mlflow.pyfunc.spark_udf(spark, model.local_uri, result_type=result, env_manager="local",
                                  params={"on_error": "row"})
    scored = frame.select("fname", udf(F.struct("image")).alias("p")).select("fname", "p.*").toPandas()
    assert list(scored.fname) == ["a.jpg", "junk.jpg", "b.jpg"]
    assert scored.error[1].startswith("not a decodable image") and list(scored.error[[0, 2]]) == ["", ""]
    expected = mlflow.pyfunc.load_model(model.local_uri).predict(pd.DataFrame({"image": good}))
    assert list(scored.camera[[0, 2]]) == list(expected.camera) and scored.camera[1] == ""
    assert scored[model.labels].iloc[1].isna().all()
