"""MAGI-1 pipelines and their pre/post-processing."""

from .guidance_magi import MagiGuidance
from .pipeline_magi import MagiPipeline
from .pipeline_magi_i2v import MagiImageToVideoPipeline
from .pipeline_magi_v2v import MagiVideoToVideoPipeline
from .pipeline_output import MagiChunkOutput, MagiPipelineOutput
from .session_magi import MagiSession, MagiSessionInterrupted, MagiSessionProgress
from .video_export_magi import write_video_stream
