# fleetml on AWS: several nodes in an auto-scaling group behind a network
# load balancer (MQTT 8883 passed through, mutual TLS ends at each node's
# broker; the API on 443 with TLS at the NLB), RDS PostgreSQL for the store,
# an S3 bucket for the lake, and an IAM role that can touch nothing but the
# lake's prefix. See docs/operations.md, "Several nodes".

terraform {
  required_version = ">= 1.5"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.0"
    }
  }
}

provider "aws" {
  region = var.region
}

# ---- network ------------------------------------------------------------------

resource "aws_vpc" "main" {
  cidr_block           = var.vpc_cidr
  enable_dns_hostnames = true
  tags                 = { Name = var.name }
}

resource "aws_internet_gateway" "main" {
  vpc_id = aws_vpc.main.id
}

resource "aws_subnet" "public" {
  count                   = length(var.azs)
  vpc_id                  = aws_vpc.main.id
  availability_zone       = var.azs[count.index]
  cidr_block              = cidrsubnet(var.vpc_cidr, 8, count.index)
  map_public_ip_on_launch = false
  tags                    = { Name = "${var.name}-public-${count.index}" }
}

resource "aws_subnet" "private" {
  count             = length(var.azs)
  vpc_id            = aws_vpc.main.id
  availability_zone = var.azs[count.index]
  cidr_block        = cidrsubnet(var.vpc_cidr, 8, 100 + count.index)
  tags              = { Name = "${var.name}-private-${count.index}" }
}

resource "aws_eip" "nat" {
  domain = "vpc"
}

resource "aws_nat_gateway" "main" {
  allocation_id = aws_eip.nat.id
  subnet_id     = aws_subnet.public[0].id
}

resource "aws_route_table" "public" {
  vpc_id = aws_vpc.main.id
  route {
    cidr_block = "0.0.0.0/0"
    gateway_id = aws_internet_gateway.main.id
  }
}

resource "aws_route_table_association" "public" {
  count          = length(var.azs)
  subnet_id      = aws_subnet.public[count.index].id
  route_table_id = aws_route_table.public.id
}

resource "aws_route_table" "private" {
  vpc_id = aws_vpc.main.id
  route {
    cidr_block     = "0.0.0.0/0"
    nat_gateway_id = aws_nat_gateway.main.id
  }
}

resource "aws_route_table_association" "private" {
  count          = length(var.azs)
  subnet_id      = aws_subnet.private[count.index].id
  route_table_id = aws_route_table.private.id
}

# The lake over a gateway endpoint: S3 traffic stays off the NAT.
resource "aws_vpc_endpoint" "s3" {
  vpc_id            = aws_vpc.main.id
  service_name      = "com.amazonaws.${var.region}.s3"
  route_table_ids   = [aws_route_table.private.id]
  vpc_endpoint_type = "Gateway"
}

# ---- security groups ---------------------------------------------------------

resource "aws_security_group" "node" {
  name   = "${var.name}-node"
  vpc_id = aws_vpc.main.id

  ingress {
    description = "MQTT over mutual TLS (devices, through the NLB)"
    from_port   = 8883
    to_port     = 8883
    protocol    = "tcp"
    cidr_blocks = ["0.0.0.0/0"]
  }
  ingress {
    description = "HTTP API (from the NLB)"
    from_port   = 8080
    to_port     = 8080
    protocol    = "tcp"
    cidr_blocks = [var.vpc_cidr]
  }
  ingress {
    description = "operations listener: health checks from inside the VPC only"
    from_port   = 9180
    to_port     = 9180
    protocol    = "tcp"
    cidr_blocks = [var.vpc_cidr]
  }
  egress {
    from_port   = 0
    to_port     = 0
    protocol    = "-1"
    cidr_blocks = ["0.0.0.0/0"]
  }
}

resource "aws_security_group" "db" {
  name   = "${var.name}-db"
  vpc_id = aws_vpc.main.id

  ingress {
    description     = "PostgreSQL from the nodes"
    from_port       = 5432
    to_port         = 5432
    protocol        = "tcp"
    security_groups = [aws_security_group.node.id]
  }
}

# ---- the store: RDS PostgreSQL -------------------------------------------------

resource "aws_db_subnet_group" "main" {
  name       = var.name
  subnet_ids = aws_subnet.private[*].id
}

resource "aws_db_parameter_group" "main" {
  name   = "${var.name}-pg15"
  family = "postgres15"
  # An acknowledged measurement must be on disk: fleetml refuses to start otherwise.
  parameter {
    name  = "synchronous_commit"
    value = "on"
  }
  parameter {
    name  = "rds.force_ssl"
    value = "1"
  }
}

resource "aws_db_instance" "main" {
  identifier                = var.name
  engine                    = "postgres"
  engine_version            = "15"
  instance_class            = var.db_instance_class
  allocated_storage         = 100
  storage_encrypted         = true
  multi_az                  = true
  db_name                   = "fleetml"
  username                  = "fleetml"
  password                  = var.db_password
  db_subnet_group_name      = aws_db_subnet_group.main.name
  vpc_security_group_ids    = [aws_security_group.db.id]
  parameter_group_name      = aws_db_parameter_group.main.name
  backup_retention_period   = 14
  deletion_protection       = true
  skip_final_snapshot       = false
  final_snapshot_identifier = "${var.name}-final"
}

# ---- the lake: S3 ---------------------------------------------------------------

resource "aws_s3_bucket" "lake" {
  bucket_prefix = "${var.name}-lake-"
}

resource "aws_s3_bucket_versioning" "lake" {
  bucket = aws_s3_bucket.lake.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "lake" {
  bucket = aws_s3_bucket.lake.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "aws:kms"
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_public_access_block" "lake" {
  bucket                  = aws_s3_bucket.lake.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

# ---- IAM: the nodes may use the lake prefix and nothing else --------------------

data "aws_iam_policy_document" "assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

data "aws_iam_policy_document" "lake" {
  statement {
    sid       = "Objects"
    actions   = ["s3:PutObject", "s3:GetObject", "s3:AbortMultipartUpload"]
    resources = ["${aws_s3_bucket.lake.arn}/fleetml/*"]
  }
  statement {
    sid       = "LakeCheck"
    actions   = ["s3:DeleteObject"]
    resources = ["${aws_s3_bucket.lake.arn}/fleetml/_check/*"]
  }
  statement {
    sid       = "List"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.lake.arn]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["fleetml/*"]
    }
  }
}

resource "aws_iam_role" "node" {
  name               = "${var.name}-node"
  assume_role_policy = data.aws_iam_policy_document.assume.json
}

resource "aws_iam_role_policy" "lake" {
  name   = "lake"
  role   = aws_iam_role.node.id
  policy = data.aws_iam_policy_document.lake.json
}

resource "aws_iam_instance_profile" "node" {
  name = "${var.name}-node"
  role = aws_iam_role.node.name
}

# ---- nodes ------------------------------------------------------------------------

resource "aws_launch_template" "node" {
  name_prefix            = "${var.name}-node-"
  image_id               = var.ami_id
  instance_type          = var.instance_type
  vpc_security_group_ids = [aws_security_group.node.id]
  iam_instance_profile {
    arn = aws_iam_instance_profile.node.arn
  }
  metadata_options {
    http_tokens = "required" # IMDSv2 only
  }
  # The image holds the binary, the systemd unit (deploy/systemd) and the shared
  # PKI; this writes the node's configuration and starts it.
  user_data = base64encode(templatefile("${path.module}/node.conf.tftpl", {
    db_host = aws_db_instance.main.address
    bucket  = aws_s3_bucket.lake.bucket
    region  = var.region
    vpc     = var.vpc_cidr
  }))
}

resource "aws_autoscaling_group" "nodes" {
  name                = "${var.name}-nodes"
  min_size            = var.node_count
  max_size            = var.node_count + 2
  desired_capacity    = var.node_count
  vpc_zone_identifier = aws_subnet.private[*].id
  target_group_arns   = [aws_lb_target_group.mqtt.arn, aws_lb_target_group.api.arn]
  health_check_type   = "ELB"
  launch_template {
    id      = aws_launch_template.node.id
    version = "$Latest"
  }
  instance_refresh {
    strategy = "Rolling"
    preferences {
      min_healthy_percentage = 66
    }
  }
}

# ---- the network load balancer ------------------------------------------------------

resource "aws_lb" "main" {
  name               = var.name
  load_balancer_type = "network"
  subnets            = aws_subnet.public[*].id
}

resource "aws_lb_target_group" "mqtt" {
  name     = "${var.name}-mqtt"
  port     = 8883
  protocol = "TCP"
  vpc_id   = aws_vpc.main.id
  health_check {
    protocol = "HTTP"
    port     = "9180"
    path     = "/readyz"
    interval = 10
  }
}

resource "aws_lb_target_group" "api" {
  name     = "${var.name}-api"
  port     = 8080
  protocol = "TCP"
  vpc_id   = aws_vpc.main.id
  health_check {
    protocol = "HTTP"
    port     = "9180"
    path     = "/readyz"
    interval = 10
  }
}

resource "aws_lb_listener" "mqtt" {
  load_balancer_arn = aws_lb.main.arn
  port              = 8883
  protocol          = "TCP"
  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.mqtt.arn
  }
}

resource "aws_lb_listener" "api" {
  load_balancer_arn = aws_lb.main.arn
  port              = 443
  protocol          = "TLS"
  certificate_arn   = var.api_certificate_arn
  ssl_policy        = "ELBSecurityPolicy-TLS13-1-2-2021-06"
  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.api.arn
  }
}
